"""Skip-Vision beside the training-free token pruners: same weights, one harness.

    python examples/compare_methods.py                       # everything, ~10 min on 2 cores
    python examples/compare_methods.py --questions 200 --repeats 3 --no-large

For every method (random, VisionZip, DivPrune, FastV, DART; Skip-Vision applied to the plain
model and the shipped Skip-FFN model) and budget (visual tokens per image that get the FFN and
stay in the KV cache): exact match on the shipped models' held-out questions (overall and per
question type), LM prefill FLOPs (counted), KV bytes, and measured times, interleaved in one
run with medians: `prepare` (vision tower + the method's selection), the LM prefill (FastV's
and DART's scoring included), one decode step. Timed on the shipped model and, with random
weights, on LLaVA-1.5's geometry scaled to this CPU (576 image tokens, benchmark.py's "cpu"
size; budgets scaled by 4). Writes JSON, a Markdown table and a plot to --out.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import compare_lib as cl  # examples/, next to these files
from benchmark_cases import build, prompt
from benchmark_lib import conditions
from cli import Parser, fail, run_main

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plain", default=str(ROOT / "checkpoints" / "tiny-llava-plain"))
    p.add_argument("--skip-ffn", default=str(ROOT / "checkpoints" / "tiny-llava"),
                   help="the Skip-FFN fine-tuned checkpoint (and its skip_config.json)")
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--methods", nargs="+", default=list(cl.METHODS), choices=cl.METHODS)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-large", action="store_true", help="time the shipped model only")
    p.add_argument("--out", default=str(ROOT / "examples" / "results" / "compare"))
    a = p.parse_args(argv)
    p.at_least(a, questions=1, repeats=1, decode_steps=1, threads=1, warmup=0)
    if any(b < 3 for b in a.budgets):
        p.error("every budget must be >= 3 (Skip-Vision: N_r + 2 summaries)")
    return a


def main(argv=None):
    a = parse_args(argv)
    from skipvision import load_pretrained
    from skipvision.io.loading import load_skip_config
    from skipvision.training.data import collate, encode, evaluate, load_conversations
    from skipvision.training.synthetic import write_dataset
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    plain, proc = load_pretrained(a.plain)
    tuned, _ = load_pretrained(a.skip_ffn)
    shipped = load_skip_config(a.skip_ffn)
    if shipped is None:
        fail(f"{a.skip_ffn} has no skip_config.json")
    N = plain.cfg.image_seq_length
    if max(a.budgets) > N:
        fail(f"a budget exceeds the {N} tokens of an image")
    data = load_conversations(write_dataset(tempfile.mkdtemp(), 20000, a.questions, seed=0,
                                            splits=("test",))["test"], proc)
    rows = []

    def accuracy(model, skip):
        r = evaluate(model, data, skip=skip, batch_size=64)
        return round(r.accuracy, 4), {k: round(v, 4) for k, v in r.by_type().items()}

    acc, by_type = accuracy(plain, None)
    rows.append(dict(method="plain", budget=N, accuracy=acc, by_type=by_type))
    for method in a.methods:
        for b in a.budgets:
            model = tuned if method == "skip-vision fine-tuned" else plain
            acc, by_type = accuracy(model, cl.policy(method, b, N, shipped))
            rows.append(dict(method=method, budget=b, accuracy=acc, by_type=by_type))
            print(f"{method} {b}: exact match {acc:.3f}", file=sys.stderr)
    t_acc = time.perf_counter() - t_start

    def key(r):
        return r["method"] if r["method"] == "plain" else f"{r['method']} {r['budget']}"

    # costs on the shipped model: one held-out question, batch 1
    ids, mask, _, px = collate([encode(data.records[0], proc, answers=False)],
                               proc.pad_token_id, [data.pixels(0)])
    timed = {key(r): (tuned if r["method"].endswith("fine-tuned") else plain,
                      None if r["method"] == "plain" else cl.policy(r["method"], r["budget"],
                                                                   N, shipped)) for r in rows}
    shipped_costs = {}
    for model in (tuned, plain):  # each model's cases, interleaved with its full run
        pol = {k: s for k, (m, s) in timed.items() if m is model or k == "plain"}
        shipped_costs |= cl.costs(model, ids, px, mask.bool(), pol, a)
    for r in rows:
        r["shipped"] = shipped_costs[key(r)]
    if not a.no_large:
        large = build(SimpleNamespace(size="cpu", layers=None, device="cpu", dtype="float32"))
        n_l = large.cfg.image_seq_length
        ids_l, mask_l, px_l, _ = prompt(large.cfg, 32, 1, "cpu")
        pol = {"plain": None} | {key(r): cl.policy(r["method"], r["budget"] * n_l // N, n_l,
                                                  shipped)
                                 for r in rows if r["method"] not in ("plain",
                                                                      "skip-vision fine-tuned")}
        large_costs = cl.costs(large, ids_l, px_l, mask_l, pol, a)
        for r in rows:
            name = key(r).replace("skip-vision fine-tuned", "skip-vision")
            r["576"] = dict(large_costs[name], budget=(r["budget"] * n_l // N))
    seconds = time.perf_counter() - t_start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(conditions=conditions(SimpleNamespace(device="cpu", dtype="float32")),
               command="python examples/compare_methods.py " + " ".join(sys.argv[1:]),
               questions=a.questions, image_tokens=N, seconds=round(seconds, 1),
               accuracy_seconds=round(t_acc, 1), rows=rows)
    (out / "compare.json").write_text(json.dumps(res, indent=1))
    md = table(rows, N, a)
    (out / "compare.md").write_text(md + "\n")
    print(md)
    if cl.plot(rows, out / "compare.png"):
        print(f"plot: {out / 'compare.png'}", file=sys.stderr)
    print(f"\n{len(rows)} rows, {seconds:.0f} s ({t_acc:.0f} s of accuracy)", file=sys.stderr)
    return res


def table(rows: list[dict], N: int, a) -> str:
    types = sorted(rows[0]["by_type"])
    large = "576" in rows[0]
    head = ["method", f"kept of {N}", "exact match", *types, "LM FLOPs", "LM prefill time",
            "tower + selection", "decode step", "KV"]
    head += ["576: LM FLOPs", "576: LM prefill time", "576: tower + selection",
             "576: decode step"] if large else []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["shipped"]
        cells = [r["method"], str(r["budget"]), f"{r['accuracy']:.3f}",
                 *(f"{r['by_type'][t]:.2f}" for t in types),
                 f"{s['lm_prefill_flops_ratio']:.3f}", f"{s['prefill']['ratio']:.3f}",
                 f"{s['prepare']['ratio']:.3f}", f"{s['decode']['ratio']:.3f}",
                 f"{s['kv_ratio']:.3f}"]
        if large:
            g = r["576"]
            cells += [f"{g['lm_prefill_flops_ratio']:.3f}", f"{g['prefill']['ratio']:.3f}",
                      f"{g['prepare']['ratio']:.3f}", f"{g['decode']['ratio']:.3f}"]
        out.append("| " + " | ".join(cells) + " |")
    base = rows[0]["shipped"]
    out.append(f"\nRatios to plain in the same run (medians of {a.repeats} interleaved repeats, "
               f"{a.threads} thread(s)); plain: LM prefill {base['prefill']['median_s'] * 1e3:.2f}"
               f" ms, decode step {base['decode']['median_s'] * 1e3:.2f} ms, "
               f"{base['lm_prefill_flops'] / 1e6:.1f} MFLOPs.")
    return "\n".join(out)


if __name__ == "__main__":
    run_main(main)
