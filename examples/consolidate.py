"""Make a model folder of a sharded training checkpoint (`examples/train.py --shard`).

    python examples/consolidate.py runs/sft/step-0000500 runs/sft-500

Reads every process's shards on one CPU and writes the llava-hf layout (config.json,
model.safetensors, tokenizer and preprocessor files) that `load_pretrained`, transformers and
`examples/generate.py --model` read. The run's last checkpoint is already consolidated.
"""
from __future__ import annotations

import sys

from skipvision.training.checkpoint import consolidate, resolve
from skipvision.training.parallel import is_sharded_checkpoint

from cli import Parser, fail, run_main  # examples/, next to this file


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a sharded checkpoint folder, or a run's output folder")
    p.add_argument("out", help="the model folder to write")
    a = p.parse_args(argv)
    ckpt = resolve(a.checkpoint)
    if not is_sharded_checkpoint(ckpt):
        fail(f"{ckpt} is not a sharded checkpoint (no .metadata); it is a model folder already")
    print(f"wrote {consolidate(ckpt, a.out)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
