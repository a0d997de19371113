"""Certify Skip-Vision's greedy answers over held-out questions (proofs/error_bound.md,
Corollary 3): how many provably equal the answer without Skip-FFN and Skip-KV, and that none
of those changed.

    python examples/certify.py                            # shipped plain model, 1,000 questions
    python examples/certify.py --model checkpoints/tiny-llava --questions 200

For each Skip-FFN / Skip-KV setting (the checkpoint's Skip-Vision settings, varied in which
layers skip and whether the cache is evicted) and each question: the reference answer (the
arranged prompt, every FFN, the whole cache), the answer `generate` gives, and the certificate.
Runs in float64 on the CPU. The questions are the shipped model's held-out split (rebuilt from
its seed), or --data (LLaVA-style JSONL).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cli import Parser, fail, run_main  # examples/, next to this file

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: changes to the checkpoint's SkipConfig
    "all layers, evict": {}, "all layers, keep": dict(kv="keep"),
    "last 2 layers, evict": "last2", "last 2 layers, keep": ("last2", "keep"),
    "last layer, evict": "last1", "last layer, keep": ("last1", "keep")}


def setting(base, spec, n_layers: int):
    spec = spec if isinstance(spec, (dict, tuple)) else (spec,)
    if isinstance(spec, dict):
        return dataclasses.replace(base, **spec)
    k = int(spec[0][-1])
    kv = spec[1] if len(spec) > 1 else "evict"
    return dataclasses.replace(base, layers=tuple(range(n_layers - k, n_layers)), kv=kv)


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "tiny-llava-plain"))
    p.add_argument("--skip-config", default=str(ROOT / "checkpoints" / "tiny-llava"),
                   help="folder whose skip_config.json gives N_r, N_s and the rest")
    p.add_argument("--data", help="LLaVA-style JSONL (default: the shipped held-out split)")
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "examples" / "results" / "certify.json"))
    a = p.parse_args(argv)
    if a.questions < 1 or a.max_new_tokens < 1:
        fail("--questions and --max-new-tokens must be >= 1")
    from skipvision import load_pretrained
    from skipvision.analysis.certify import certify, reference_answer
    from skipvision.generate import generate
    from skipvision.io.loading import load_skip_config
    from skipvision.training.data import collate, encode, load_conversations
    from skipvision.training.synthetic import write_dataset
    torch.set_num_threads(1)
    model, proc = load_pretrained(a.model, dtype=torch.float64)
    base = load_skip_config(a.skip_config)
    if base is None:
        fail(f"{a.skip_config} has no skip_config.json")
    data_path = a.data or write_dataset(tempfile.mkdtemp(), 20000, a.questions, seed=0,
                                        splits=("test",))["test"]  # make_shipped_model's split
    data = load_conversations(data_path, proc)
    n = min(a.questions, len(data.records))
    L = model.cfg.text.num_hidden_layers
    rows, t0 = [], time.perf_counter()
    for name, spec in SETTINGS.items():
        skip = setting(base, spec, L)
        count = dict(setting=name, questions=n, certified=0, changed=0, certified_and_changed=0,
                     steps=0, steps_certified=0, flipped_steps=0)
        for i in range(n):
            ids, mask, _, px = collate([encode(data.records[i], proc, answers=False)],
                                       proc.pad_token_id, [data.pixels(i)])
            px = px.double()
            inp = model.prepare(ids, px, mask, skip=skip)
            c = certify(model, inp, skip, reference_answer(model, inp, a.max_new_tokens))
            got = generate(model, ids, px, mask, max_new_tokens=a.max_new_tokens, skip=skip)
            changed = not torch.equal(got.tokens[0, :int(got.lengths[0])], c.tokens)
            count["certified"] += c.certified
            count["changed"] += changed
            count["certified_and_changed"] += c.certified and changed
            count["steps"] += len(c.steps)
            count["steps_certified"] += int(c.steps.sum())
            count["flipped_steps"] += int(c.flipped.sum())
        rows.append(count)
        print(f"{name}: {count['certified']}/{n} answers certified, {count['changed']} changed, "
              f"{count['certified_and_changed']} certified and changed", file=sys.stderr)
    seconds = time.perf_counter() - t0
    print("| Skip-FFN layers, cache | answers certified | answers changed | certified and "
          "changed | steps certified |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['certified']}/{n} ({100 * r['certified'] / n:.1f}%) | "
              f"{r['changed']} | {r['certified_and_changed']} | "
              f"{r['steps_certified']}/{r['steps']} |")
    print(f"\n{a.model}, N_r/N_s {base.retained}/{base.skipped}, {n} questions, "
          f"{seconds:.0f} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(model=a.model, skip=dataclasses.asdict(base),
                                           seconds=round(seconds, 1), rows=rows), indent=2))
    if any(r["certified_and_changed"] for r in rows):
        raise SystemExit("a certified answer changed: the bound is wrong")
    return rows


if __name__ == "__main__":
    run_main(main)
