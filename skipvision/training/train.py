"""Fine-tuning a LLaVA, plain or with Skip-Vision (the paper applies Skip-FFN in SFT).

- Loss: next-token cross-entropy on answer tokens only, summed over the global batch and divided
  by its answer-token count, so it does not depend on how the batch is cut into micro-batches
  (gradient accumulation) or processes. With Skip-Vision the labels follow their text tokens
  into the arranged sequence (`Layout.index`); image and summary tokens carry no loss.
- AdamW (weight decay on matrices only), linear warmup then cosine to `min_lr`, gradient
  clipping on the global norm, bf16 autocast on CUDA.
- Which parts train: any of `vision_tower`, `projector`, `language_model`, `summary`. Weights
  the forward never uses (vision layers past the feature layer, `post_layernorm`, the summary
  scorer without summary tokens) stay frozen whatever is asked.
- Many processes: under `torchrun`, each process takes its slice of every global batch and
  DistributedDataParallel averages gradients (gloo on CPU, nccl on CUDA); or, with `shard`,
  FSDP2 (parallel.py) also splits weights, gradients and AdamW state among the processes.
- `checkpointing`: activation checkpointing of every vision and decoder layer.
- Exact resume: the data order is a pure function of (seed, step); a checkpoint (checkpoint.py)
  holds weights, optimizer, schedule, step and RNG state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NonFiniteError
from ..skip import TEXT
from . import parallel
from .parallel import Dist
from .data import IGNORE, ConversationData, collate

PARTS = {"vision_tower": "vision_tower.", "projector": "multi_modal_projector.",
         "language_model": "language_model.", "summary": "summary_scorer."}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run (the schedule's length)
    batch_size: int = 32  # examples per optimizer step, all processes together
    micro_batch_size: int = 0  # examples per forward in each process; 0: batch_size / processes
    lr: float = 1e-3
    min_lr: float = 1e-4  # where the cosine ends
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    train: tuple[str, ...] = ("projector", "language_model", "summary")
    seed: int = 0  # data order
    amp: bool = True  # bf16 compute on CUDA: autocast, or with `shard` FSDP2's mixed precision
    shard: bool = False  # FSDP2: weights, gradients and AdamW state split among processes
    checkpointing: bool = False  # recompute each layer's activations in backward

    def __post_init__(self):
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "betas", tuple(self.betas))
        bad = [p for p in self.train if p not in PARTS]
        if bad or not self.train:
            raise ConfigError(f"unknown trainable part(s) {bad}; choose from {sorted(PARTS)}")
        if self.steps < 1 or self.batch_size < 1 or self.micro_batch_size < 0:
            raise ConfigError("steps and batch_size must be >= 1, micro_batch_size >= 0")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based): warmup, then cosine to min_lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of global batch `step`: a stream of per-epoch permutations, cut in batches."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out += perm[offset:offset + batch_size - len(out)].tolist()
    return out


def unused_prefixes(model) -> list[str]:
    """Parameter prefixes the forward never touches: they get no gradient, so they stay frozen."""
    cfg = model.cfg
    last = max(cfg.feature_layers)
    out = ["vision_tower.vision_model.post_layernorm."]
    out += [f"vision_tower.vision_model.encoder.layers.{i}."
            for i in range(last, cfg.vision.num_hidden_layers)]
    return out


def set_trainable(model, parts, skip=None) -> list[tuple[str, nn.Parameter]]:
    """requires_grad on the chosen parts' used parameters, off elsewhere; returns the trained."""
    frozen = unused_prefixes(model)
    if skip is None or not getattr(skip, "summary", False):
        frozen.append(PARTS["summary"])
    trained = []
    for name, p in model.named_parameters():
        on = any(name.startswith(PARTS[k]) for k in parts) and not any(
            name.startswith(f) for f in frozen)
        p.requires_grad_(on)
        if on:
            trained.append((name, p))
    if not trained:
        raise ConfigError(f"nothing to train: parts {parts} have no used parameters")
    return trained


def make_optimizer(trained, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in trained if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in trained if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


class AnswerLoss(nn.Module):
    """Summed cross-entropy over answer tokens; a module so DistributedDataParallel can wrap it."""

    def __init__(self, model, skip=None):
        super().__init__()
        self.model, self.skip = model, skip

    def forward(self, input_ids, attention_mask, labels, pixel_values) -> torch.Tensor:
        inp = self.model.prepare(input_ids, pixel_values, attention_mask, skip=self.skip)
        if inp.layout is not None:  # Skip-Vision rearranged the sequence; labels follow text
            moved = labels.flatten()[inp.layout.index.clamp(min=0)]
            labels = moved.masked_fill(inp.layout.kind != TEXT, IGNORE)
        hidden = self.model.run(inp)
        target = labels[:, 1:]
        keep = target != IGNORE
        logits = self.model.logits(hidden[:, :-1][keep])  # only where a label is
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
        return F.cross_entropy(logits, target[keep], reduction="sum")


@dataclass
class StepStats:
    step: int  # optimizer steps done after this one
    loss: float  # mean answer-token loss of the global batch
    lr: float
    tokens: int  # prompt + answer tokens in the global batch (padding excluded)
    seconds: float  # wall time of the step, data loading included


class Trainer:
    """The training loop's state and one optimizer step at a time (`step()`).

    Keeping the loop body as a method lets two trainers run interleaved, step by step, in
    one process: the side-by-side timing of plain vs Skip-FFN SFT.
    """

    def __init__(self, model, data: ConversationData, cfg: TrainConfig, skip=None,
                 pad_id: int = 0, dist_: Dist | None = None):
        self.model, self.data, self.cfg, self.skip, self.pad_id = model, data, cfg, skip, pad_id
        self.dist = dist_ or Dist(device=next(model.parameters()).device)
        world = self.dist.world
        self.micro = cfg.micro_batch_size or cfg.batch_size // world
        if self.micro < 1 or cfg.batch_size % (world * self.micro):
            raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of processes "
                             f"({world}) x micro_batch_size ({self.micro})")
        self.accum = cfg.batch_size // (world * self.micro)
        self.trained = set_trainable(model, cfg.train, skip)
        loss = AnswerLoss(model, skip)
        if cfg.checkpointing:
            parallel.checkpoint_layers(model)
        self.awaiting_weights = False
        if cfg.shard:  # process 0 holds the weights (the others may hold meta tensors)
            full = model.state_dict() if self.dist.rank == 0 and not _is_meta(model) else None
            model.to("meta")
            loss = parallel.shard(loss, model, self.dist.device, cfg.amp)
            self.awaiting_weights = not parallel.fill(model, self.dist.device, full)  # or resume
            self.trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        elif world > 1:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            text_only = any(r.image is None for r in data.records)  # batches may skip the tower
            loss = nn.parallel.DistributedDataParallel(loss, device_ids=ids,
                                                       find_unused_parameters=text_only)
        self.loss = loss
        self.params = [p for _, p in self.trained]
        self.optimizer = make_optimizer(self.trained, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cfg.lr_at(s) / cfg.lr)
        self.step_count = 0

    def autocast(self):
        dev = self.dist.device
        if dev.type == "cuda" and self.cfg.amp and not self.cfg.shard:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def gradient_sync(self, sync: bool):
        """Reduce gradients over processes after this backward (the last micro-batch) or not."""
        if self.cfg.shard:
            self.loss.set_requires_gradient_sync(sync)
        elif self.dist.world > 1 and not sync:
            return self.loss.no_sync()
        return contextlib.nullcontext()

    def gathered(self):
        """Context for running the model outside a step (evaluation): sharded, its root unit."""
        return parallel.gathered(self.loss) if self.cfg.shard else contextlib.nullcontext()

    def _batches(self, step: int):
        idx = batch_indices(len(self.data), self.cfg.batch_size, self.cfg.seed, step)
        share = self.micro * self.accum
        mine = idx[self.dist.rank * share:(self.dist.rank + 1) * share]
        dev, dtype = self.dist.device, next(self.model.parameters()).dtype
        for j in range(0, share, self.micro):
            chunk = mine[j:j + self.micro]
            ids, mask, labels, px = collate([self.data.encoded[i] for i in chunk], self.pad_id,
                                            [self.data.pixels(i) for i in chunk])
            yield (ids.to(dev), mask.to(dev), labels.to(dev),
                   None if px is None else px.to(dev, dtype))

    def step(self) -> StepStats:
        """One optimizer step on global batch number `step_count`."""
        t0 = time.perf_counter()
        if self.awaiting_weights:
            raise RuntimeError("sharded trainer built without weights: resume from a checkpoint")
        self.model.train()
        batches = list(self._batches(self.step_count))
        counts = torch.tensor([sum(int((b[2][:, 1:] != IGNORE).sum()) for b in batches),
                               sum(int(b[1].sum()) for b in batches)], dtype=torch.float64)
        n_labels, n_tokens = self.dist.all_sum(counts.to(self.dist.device)).tolist()
        total = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for j, b in enumerate(batches):
            with self.gradient_sync(j == len(batches) - 1), self.autocast():
                loss_sum = self.loss(*b)
                # DDP and FSDP average over processes; this scale makes it the global mean
                (loss_sum * (self.dist.world / max(n_labels, 1))).backward()
            total += loss_sum.detach().double()
        loss = float(self.dist.all_sum(total)) / max(n_labels, 1)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = nn.utils.clip_grad_norm_(self.params, clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"step {self.step_count + 1}: the loss is {loss} and the gradient norm {norm}; "
                f"the weights stay those of step {self.step_count} (lower the learning rate, "
                "or check the data and the weights)")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        return StepStats(self.step_count, loss, lr, int(n_tokens), time.perf_counter() - t0)

    def state_dict(self) -> dict:
        """Everything besides the weights that an exact resume needs (plain types, tensors)."""
        state = {"step": self.step_count, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                 "config": _plain(dataclasses.asdict(self.cfg)),
                 "skip": None if self.skip is None else _plain(dataclasses.asdict(self.skip)),
                 "world": self.dist.world}
        if self.cfg.shard:  # sharded AdamW state goes to the sharded checkpoint (shard.save)
            del state["optimizer"]
        return state

    def load_state_dict(self, state: dict):
        mine = _plain(dataclasses.asdict(self.cfg))
        for key in ("steps", "batch_size", "seed", "train", "lr", "min_lr", "warmup_steps"):
            if state["config"][key] != mine[key]:
                raise ConfigError(f"cannot resume: the checkpoint was trained with {key}="
                                 f"{state['config'][key]!r}, this run asks for {mine[key]!r}")
        theirs = state["skip"]
        if theirs != (None if self.skip is None else _plain(dataclasses.asdict(self.skip))):
            raise ConfigError(f"cannot resume: the checkpoint was trained with skip={theirs}")
        if "optimizer" in state:  # else a sharded checkpoint's, read by shard.load
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step_count = int(state["step"])


def _is_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def _plain(obj):
    """Tuples to lists, recursively: what a checkpoint stores and compares."""
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
