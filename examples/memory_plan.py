"""`examples/train.py --plan`: the memory each GPU needs for a training run, before renting.

    python examples/train.py --plan --model llava-hf/llava-1.5-7b-hf --gpus 8 --shard \\
        --batch-size 128 --micro-batch-size 16 --skip

Prints, per GPU, weights, gradients, AdamW state, FSDP2's gathered units (or autocast's
copies), and activations, for plain SFT and SFT with Skip-FFN, with and without activation
checkpointing (skipvision/analysis/memory.py says what each figure counts).
"""
from __future__ import annotations

from skipvision.analysis.memory import GIB, plan
from skipvision.skip import SkipConfig


def add_arguments(p):
    g = p.add_argument_group("memory plan (--plan)")
    g.add_argument("--plan", action="store_true", help="print the memory per GPU and exit")
    g.add_argument("--gpus", type=int, default=1, help="GPUs the run will use")
    g.add_argument("--text-tokens", type=int, default=1472,
                   help="text tokens per sequence, the longest in a micro-batch (1472 + 576 "
                   "image tokens = LLaVA-1.5's 2048)")
    g.add_argument("--answer-tokens", type=int, default=None,
                   help="answer tokens per sequence (default: all text tokens)")
    g.add_argument("--images", type=int, default=1, help="images per sequence")
    g.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU, to say fits")


def print_plan(a, cfg, skip: SkipConfig | None, fail) -> None:
    """The table for the model config `cfg` and the parsed flags `a`."""
    if a.gpus < 1 or a.text_tokens < 0 or a.images < 0 or (a.answer_tokens or 0) < 0:
        fail("--gpus must be >= 1 and --text-tokens, --answer-tokens, --images >= 0")
    if cfg.image_grid_pinpoints:
        fail("--plan counts LLaVA-1.5's fixed image tokens; LLaVA-NeXT's depend on each "
             "image's size and are not planned yet")
    micro = a.micro_batch_size or max(1, a.batch_size // a.gpus)
    skip = skip or SkipConfig()
    weight_bytes = {"float64": 8, "float32": 4}.get(a.dtype, 2)
    compute = 2 if not a.no_amp else weight_bytes
    train = tuple(a.train.split(","))
    print(f"per GPU: {a.gpus} GPU(s), {'sharded (FSDP2)' if a.shard else 'unsharded (DDP)'}, "
          f"micro-batch {micro} x ({a.text_tokens} text tokens + {a.images} image(s)), "
          f"weights {a.dtype}, compute {'bf16' if compute == 2 else a.dtype}; GiB")
    columns = [(s, c) for s in (None, skip) for c in (False, True)]
    plans = [plan(cfg, gpus=a.gpus, micro_batch=micro, text=a.text_tokens, images=a.images,
                  answer=a.answer_tokens, skip=s, shard=a.shard, checkpointing=c,
                  weight_bytes=weight_bytes, compute_bytes=compute, train=train)
             for s, c in columns]
    names = [("plain" if s is None else f"Skip-FFN {s.retained}/{s.skipped}")
             + (" + ckpt" if c else "") for s, c in columns]
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for row in ("weights", "gradients", "optimizer", "gathered", "activations", "total"):
        print(f"| {row} | " + " | ".join(f"{getattr(x, row) / GIB:.1f}" for x in plans) + " |")
    fits = ["yes" if x.total <= a.gpu_memory * GIB else "no" for x in plans]
    print(f"| fits in {a.gpu_memory:g} GiB | " + " | ".join(fits) + " |")
