"""A training run around `train.Trainer`: progress bar, periodic evaluation and checkpoints.

`fit` steps until `cfg.steps`, logs every step to `OUT/log.jsonl`, evaluates every
`eval_every` steps, checkpoints every `save_every` steps and at the end (checkpoint.py), and
resumes exactly from `resume` (a checkpoint folder or OUT). If a batch cannot be read
(`DataError`) or the run is interrupted, the last completed step is checkpointed before the
error propagates: nothing already trained is lost.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import parallel
from .checkpoint import load_trainer_state, resolve, save_checkpoint, save_sharded_checkpoint
from ..errors import NonFiniteError
from .data import DataError, evaluate
from ..io.hf_config import from_hf
from .train import StepStats, Trainer
from ..vlm import Llava


class Progress:
    """One status line: step, loss, lr, tokens/s, seconds/step, time left (TTY: redrawn)."""

    def __init__(self, total: int, start: int = 0, stream=None, every: int = 10,
                 enabled: bool = True):
        stream = sys.stderr if stream is None else stream
        self.total, self.start, self.stream, self.every = total, start, stream, every
        self.enabled = enabled
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.recent: list[StepStats] = []

    def line(self, s: StepStats) -> str:
        self.recent = (self.recent + [s])[-50:]
        tps = sum(r.tokens for r in self.recent) / max(1e-9, sum(r.seconds for r in self.recent))
        per_step = statistics.median(r.seconds for r in self.recent)
        left = per_step * (self.total - s.step)
        done = int(20 * s.step / self.total)
        return (f"step {s.step}/{self.total} [{'#' * done}{'.' * (20 - done)}] loss {s.loss:.4f} "
                f"lr {s.lr:.2e} {tps:,.0f} tok/s {per_step:.2f} s/step left {_hms(left)}")

    def update(self, s: StepStats):
        text = self.line(s)
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            self.stream.flush()
        elif s.step % self.every == 0 or s.step == self.total:
            print(text, file=self.stream, flush=True)

    def note(self, text: str):
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=self.stream, flush=True)


def build_model(config, tokenizer, seed: int = 0, dtype=None):
    """(model, processor) for a new model: `config` a LlavaConfig or a llava-hf config.json
    path, `tokenizer` a tokenizers.Tokenizer or a tokenizer.json path; PyTorch's default
    initialisation under `torch.manual_seed(seed)` (the global RNG is left as it was)."""
    from tokenizers import Tokenizer

    from ..io.images import ImageProcessor
    from ..io.processor import Processor
    if isinstance(config, (str, Path)):
        config = from_hf(json.loads(Path(config).read_text()))
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llava(config)
    S = config.vision.image_size
    return model.to(dtype or torch.float32), Processor(config, tokenizer, ImageProcessor(S, (S, S)))


def with_summary_scorer(model: Llava) -> Llava:
    """`model` with a summary scorer added, zero-initialised so that the summary tokens start as
    plain means of their groups; the paper trains this module in SFT, from a plain checkpoint."""
    if model.summary_scorer is not None:
        return model
    p = next(model.parameters())
    with torch.device(p.device):  # meta stays meta: sharded training fills it later
        new = Llava(model.cfg.replace(summary_scorer=True)).to(p.dtype)
    extra = {f"summary_scorer.{k}": v for k, v in new.summary_scorer.state_dict().items()}
    new.load_state_dict(model.state_dict() | extra, strict=True)
    return new


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def resume(trainer: Trainer, path) -> Path:
    """Load optimizer, schedule, step and RNG from a checkpoint; from a sharded one, the
    weights too (else they are the caller's: load_pretrained from the same folder)."""
    ckpt = resolve(path)
    trainer.load_state_dict(load_trainer_state(ckpt))
    if parallel.is_sharded_checkpoint(ckpt):
        parallel.load(ckpt, trainer.model, trainer.optimizer)
        trainer.awaiting_weights = False
    return ckpt


def run_eval(trainer: Trainer, data, batch_size: int = 64) -> dict:
    """Exact match on `data`, each process scoring its share, counts summed over processes."""
    d = trainer.dist
    with trainer.gathered(), trainer.autocast():
        res = evaluate(trainer.model, data, trainer.skip, batch_size, (d.rank, d.world))
    types = sorted(res.total)
    counts = torch.tensor([[res.correct[t], res.total[t]] for t in types], dtype=torch.float64)
    counts = d.all_sum(counts.to(d.device)).cpu()
    by_type = {t: round(c / n, 4) for t, (c, n) in zip(types, counts.tolist()) if n}
    total = counts.sum(0).tolist()
    return {"accuracy": total[0] / max(1, total[1]), "n": int(total[1]), "by_type": by_type}


def fit(trainer: Trainer, out_dir, processor, eval_data=None, eval_every: int = 0,
        save_every: int = 0, keep_last: int = 2, stop_after: int | None = None,
        progress: Progress | None = None, eval_batch_size: int = 64) -> dict:
    """Train to `trainer.cfg.steps` (or stop after `stop_after` steps in total); returns the
    last step's stats and the last evaluation."""
    cfg, main = trainer.cfg, trainer.dist.rank == 0
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    progress = progress or Progress(cfg.steps, trainer.step_count, enabled=main)
    saved, last, result = trainer.step_count, None, {}

    def save(info, together: bool = True):
        nonlocal saved
        if cfg.shard:  # every process writes its shards; the run's end is also consolidated
            save_sharded_checkpoint(out, trainer.step_count, trainer.model, trainer.optimizer,
                                    processor, trainer.state_dict(), info, keep_last,
                                    export=trainer.step_count == cfg.steps)
        elif main:
            save_checkpoint(out, trainer.step_count, trainer.model, processor,
                            trainer.state_dict(), info, keep_last)
        if together:
            trainer.dist.barrier()
        saved = trainer.step_count

    try:
        while trainer.step_count < end:
            last = trainer.step()
            progress.update(last)
            if main:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(last.__dict__) + "\n")
            n = trainer.step_count
            if eval_data is not None and ((eval_every and n % eval_every == 0) or n == cfg.steps):
                t0 = time.perf_counter()
                result["eval"] = run_eval(trainer, eval_data, eval_batch_size)
                progress.note(f"eval at step {n}: exact match {result['eval']['accuracy']:.4f} "
                              f"on {result['eval']['n']} ({time.perf_counter() - t0:.1f} s) "
                              f"{result['eval']['by_type']}")
            if (save_every and n % save_every == 0) or n == end:
                save({"loss": None if last is None else last.loss, "eval": result.get("eval")})
    except (DataError, NonFiniteError, KeyboardInterrupt) as e:
        # sharded, every process must join the save: only a NonFiniteError (from summed loss
        # and norm) is sure to stop them all alike; else the last periodic checkpoint stands
        if trainer.step_count != saved and (not cfg.shard or isinstance(e, NonFiniteError)):
            progress.note(f"stopping: saving the last completed step {trainer.step_count}")
            save({"loss": None if last is None else last.loss, "stopped": True}, False)
        raise
    result["last"] = None if last is None else last.__dict__
    result["checkpoint"] = str(out / f"step-{trainer.step_count:07d}")
    return result
