"""Fine-tune a LLaVA on LLaVA-style JSONL conversations, plain or with Skip-Vision (Skip-FFN).

    python examples/train.py --model checkpoints/tiny-llava --data train.jsonl \\
        --eval-data test.jsonl --out runs/sft --steps 500 --skip --retained 25 --skipped 39

Several processes (DistributedDataParallel; gloo on CPU, nccl on CUDA), same global batch:

    torchrun --nproc_per_node 2 examples/train.py ...same flags...

A model too big for one GPU: `--shard` splits weights, gradients and AdamW state among the
processes (FSDP2), `--checkpointing` recomputes activations in backward; `--plan` prints the
memory each GPU needs, before renting them:

    python examples/train.py --plan --model llava-hf/llava-1.5-7b-hf --gpus 8 --shard ...
    torchrun --nproc_per_node 8 examples/train.py --shard --checkpointing ...

Resume exactly where a run stopped (weights, optimizer, schedule, data order, step):

    python examples/train.py --resume runs/sft ...same flags...

Each checkpoint (runs/sft/step-NNNNNNN, runs/sft/latest) is a model folder that
`skipvision.load_pretrained` and `examples/generate.py --model` read; with `--shard`, the last
one is (`examples/consolidate.py` makes one of any other), and every one resumes on any
number of processes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from skipvision.errors import NonFiniteError
from skipvision.skip import SkipConfig
from skipvision.training.checkpoint import checkpoints
from skipvision.training.data import DataError, load_conversations
from skipvision.training.fit import build_model, fit, resume, with_summary_scorer
from skipvision.training.parallel import init_distributed, is_sharded_checkpoint
from skipvision.training.train import PARTS, TrainConfig, Trainer

import memory_plan  # examples/, next to this file
from cli import Parser, fail, run_main


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint folder or Hub id to start from")
    g.add_argument("--config", help="or: a llava-hf config.json to build a new model from")
    g.add_argument("--tokenizer", help="with --config: the tokenizer.json to use")
    g.add_argument("--init-seed", type=int, default=0, help="with --config: weight init seed")
    g.add_argument("--resume", help="training output folder or checkpoint to resume from")
    g.add_argument("--dtype", default="float32", help="weights' dtype (float32, float64, ...)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training JSONL (required unless --plan)")
    g.add_argument("--eval-data", help="held-out JSONL scored by exact match")
    g.add_argument("--image-root", help="folder image paths are relative to (default: the "
                   "JSONL's folder)")
    g.add_argument("--skip-bad-data", action="store_true",
                   help="leave out bad records (listed) instead of stopping")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=32, help="global batch (all processes)")
    g.add_argument("--micro-batch-size", type=int, default=0,
                   help="per process and forward; 0 = batch / processes (no accumulation)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--train", default="projector,language_model,summary",
                   help=f"comma-separated parts to train, of {sorted(PARTS)}")
    g.add_argument("--seed", type=int, default=0, help="data order")
    g.add_argument("--no-amp", action="store_true", help="no bf16 compute on CUDA")
    g.add_argument("--shard", action="store_true", help="FSDP2: split weights, gradients and "
                   "optimizer state among the processes")
    g.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing: recompute each layer in backward")
    g = p.add_argument_group("Skip-Vision (SFT with Skip-FFN)")
    g.add_argument("--skip", action="store_true", help="train with Skip-Vision")
    g.add_argument("--retained", type=int, default=SkipConfig.retained)
    g.add_argument("--skipped", type=int, default=SkipConfig.skipped)
    g.add_argument("--no-summary", action="store_true", help="no summary tokens")
    g.add_argument("--mask", default=SkipConfig.mask, choices=["causal", "consistent"])
    g.add_argument("--merge-order", default=SkipConfig.merge_order,
                   choices=["redundancy", "spatial"])
    g.add_argument("--skip-layers", help="comma-separated decoder layers with Skip-FFN "
                   "(default: all)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (default: the --resume folder)")
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--save-every", type=int, default=0, help="0: only at the end")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (0: all)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps in total")
    memory_plan.add_arguments(p)
    a = p.parse_args(argv)
    if a.plan and not (a.model or a.config):
        p.error("--plan needs the model: --model or --config")
    if not (a.model or a.config or a.resume):
        p.error("give --model, --config (+ --tokenizer) or --resume")
    if a.config and not a.tokenizer and not a.plan:
        p.error("--config needs --tokenizer")
    if not (a.out or a.resume or a.plan):
        p.error("give --out")
    if not (a.data or a.plan):
        p.error("give --data")
    for flag in ("steps", "batch_size", "micro_batch_size", "warmup", "eval_every", "save_every",
                 "keep", "threads", "stop_after"):
        v = getattr(a, flag)
        if v is not None and v < (1 if flag in ("steps", "batch_size", "threads") else 0):
            p.error(f"--{flag.replace('_', '-')} {v} is out of range")
    for flag in ("lr", "min_lr", "weight_decay", "grad_clip"):
        if not 0 <= getattr(a, flag) < float("inf"):
            p.error(f"--{flag.replace('_', '-')} must be a finite number >= 0")
    bad = sorted(set(a.train.split(",")) - set(PARTS))
    if bad:
        p.error(f"--train {bad}: choose from {sorted(PARTS)}")
    if a.skip_layers and not all(x.strip().isdigit() for x in a.skip_layers.split(",")):
        p.error(f"--skip-layers {a.skip_layers!r}: comma-separated layer numbers")
    return a


def main(argv=None):
    from skipvision.io.hf_config import from_hf
    from skipvision.io.loading import load_pretrained, torch_dtype
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    skip = None
    if a.skip:
        layers = None if not a.skip_layers else tuple(int(x) for x in a.skip_layers.split(","))
        skip = SkipConfig(retained=a.retained, skipped=a.skipped, summary=not a.no_summary,
                          mask=a.mask, merge_order=a.merge_order, layers=layers)
    if a.plan:
        cfg = (from_hf(json.loads(Path(a.config).read_text())) if a.config else
               load_pretrained(a.model, device="meta")[0].cfg)
        return memory_plan.print_plan(a, cfg, skip, fail)
    if a.device and a.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {a.device}: no CUDA device here")
    d = init_distributed(a.device, a.shard)
    dtype = torch_dtype(a.dtype)
    ckpt = None
    if a.resume:
        from skipvision.training.checkpoint import resolve
        ckpt = resolve(a.resume)
        sharded = is_sharded_checkpoint(ckpt)  # its weights are read with the optimizer's
        model, processor = load_pretrained(ckpt, dtype=dtype, device="meta" if sharded else "cpu")
        if sharded and not a.shard:
            from skipvision.training.parallel import load
            model.to_empty(device="cpu")
            load(ckpt, model)
    elif a.model:  # sharded, process 0 reads the weights and hands out their shards
        meta = a.shard and d.rank != 0
        model, processor = load_pretrained(a.model, dtype=dtype, device="meta" if meta else "cpu")
    else:
        model, processor = build_model(a.config, a.tokenizer, a.init_seed, dtype)
    if skip is not None and skip.summary:
        model = with_summary_scorer(model)
    if not a.shard:
        model = model.to(d.device)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, micro_batch_size=a.micro_batch_size,
                      lr=a.lr, min_lr=a.min_lr, warmup_steps=a.warmup,
                      weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                      train=tuple(a.train.split(",")), seed=a.seed, amp=not a.no_amp,
                      shard=a.shard, checkpointing=a.checkpointing)
    data = load_conversations(a.data, processor, a.image_root, a.skip_bad_data)
    evals = None if not a.eval_data else load_conversations(
        a.eval_data, processor, a.image_root, a.skip_bad_data)
    if d.rank == 0:
        for ds in [data] + ([evals] if evals else []):
            for line, msg in ds.problems:
                print(f"left out {ds.path}:{line}: {msg}", file=sys.stderr)
    trainer = Trainer(model, data, cfg, skip, processor.pad_token_id, d)
    if ckpt is not None:
        resume(trainer, ckpt)
    out = Path(a.out or (ckpt.parent if ckpt else "."))
    try:
        result = fit(trainer, out, processor, evals, a.eval_every, a.save_every, a.keep,
                     a.stop_after)
    except (DataError, NonFiniteError) as e:
        saved = checkpoints(out)
        where = (f"the last completed step is saved in {saved[-1]}; fix the cause and resume "
                 f"with --resume {out}" if saved else "no step completed, nothing was saved")
        raise type(e)(f"{e} ({where})") if isinstance(e, NonFiniteError) else DataError(
            e.path, e.problems, f" ({where})") from None
    if d.rank == 0:
        print(f"\nsaved {result['checkpoint']}", file=sys.stderr)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
