"""Run under torchrun by test_parallel.py: one sharded training step on the tiny model, and the
bytes each process holds of the weights, gradients and AdamW state, written as JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config  # noqa: E402
from skipvision.skip import SkipConfig  # noqa: E402
from skipvision.training.data import load_conversations  # noqa: E402
from skipvision.training.fit import build_model, with_summary_scorer  # noqa: E402
from skipvision.training.parallel import init_distributed, local_bytes  # noqa: E402
from skipvision.training.synthetic import build_tokenizer  # noqa: E402
from skipvision.training.train import TrainConfig, Trainer  # noqa: E402


def main(data: str, out: str, shard: bool):
    torch.set_num_threads(1)
    d = init_distributed("cpu", shard)
    tok = build_tokenizer()
    model, proc = build_model(tiny_config(tok.get_vocab_size()), tok, 0, torch.float64)
    model = with_summary_scorer(model)
    cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=1, shard=shard,
                      train=("vision_tower", "projector", "language_model", "summary"))
    t = Trainer(model, load_conversations(data, proc), cfg, SkipConfig(retained=8, skipped=12),
                proc.pad_token_id, d)
    for b in t._batches(0):
        t.loss(*b).backward()
    grads = local_bytes(p.grad for p in t.params)
    t.optimizer.step()
    moments = [v for s in t.optimizer.state.values() for k, v in s.items() if k != "step"]
    result = {"weights": local_bytes(model.parameters()), "gradients": grads,
              "optimizer": local_bytes(moments), "trained": local_bytes(t.params)}
    Path(f"{out}.{d.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "shard")
