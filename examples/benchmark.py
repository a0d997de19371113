"""What Skip-Vision saves, measured side by side in one run: latency, KV cache, memory, FLOPs.

    python examples/benchmark.py                       # CPU-sized LLaVA-1.5 proportions
    python examples/benchmark.py --device cuda --dtype bfloat16 --size llava-1.5-7b

Every comparison is interleaved: each repeat runs every variant once, alternating their order,
after warm-up repeats; CUDA is synchronised before and after each timed call. Reported are
medians, and ratios as the median over repeats of the per-repeat ratio (paired, so slow
moments of a shared machine hit both sides). Measured, against the analytic numbers of
skipvision.analysis.flops:
- prefill of the language model (LM), plain vs Skip-Vision; and end to end (vision included);
- per-token decode, plain vs Skip-Vision with kv "keep" and with kv "evict";
- KV-cache bytes after prefill; peak memory of a prefill and of a training step;
- a training step of the LM (forward, backward, AdamW), plain vs Skip-FFN;
- our plain model vs transformers' LlavaForConditionalGeneration on the same weights
  (prefill end to end, and decode);
- LM prefill time and FLOPs for several N_r/N_s settings (the plots).
The model has random weights: latency and FLOPs do not depend on them (greedy decoding runs a
fixed number of steps). Output: a table on stdout, and benchmark.{json,md,png} in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from skipvision import KVCache, LlavaConfig, TextConfig, VisionConfig, flops
from skipvision.generate import prefill
from skipvision.skip import PRESETS, SkipConfig

from cli import Parser, fail, run_main  # examples/, next to this file

import benchmark_lib as lib  # examples/, next to this file
from benchmark_cases import (DTYPES, SIZES, adamw, build, decode_case, hf_decode_case, hf_prefill,
                             hf_twin, kv_bytes, lm_prefill_case, prompt, train_case)

PARTS = ("train", "hf", "sweep", "memory")  # what --skip-parts may leave out
LLAVA_15 = [k for k, v in PRESETS.items() if v.retain == "cls_attention"]  # not the HD ones


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="default: cpu")
    p.add_argument("--layers", type=int, help="override the LM's number of layers")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--preset", help="Skip-Vision setting for the detailed comparison: a preset "
                   f"name ({', '.join(PRESETS)}) or R/S (default: sv-llava-100-156; for the "
                   "next-* sizes sv-llava-hd-576-576)")
    p.add_argument("--sweep", help="comma-separated settings for the N_r/N_s plot (default: "
                   "the LLaVA-1.5 presets; for next-* sizes the HD preset)")
    p.add_argument("--image-size", default="672x672", help="LLaVA-NeXT sizes: the image's "
                   "height x width (default 672x672: the thumbnail and 4 tiles, 5 x 576 tokens)")
    p.add_argument("--text", type=int, default=64, help="text tokens in the prompt, around the "
                   "image (default: 64, a LLaVA-1.5 system prompt + question)")
    p.add_argument("--batch", type=int, default=1, help="prompts per batch (default: 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default: 32)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default: 2)")
    p.add_argument("--skip-parts", default="", help="comma-separated parts not to run: "
                   + ", ".join(PARTS))
    p.add_argument("--out", default="examples/results", help="default: examples/results")
    a = p.parse_args(argv)
    next_ = "next" in a.size
    a.preset = a.preset or ("sv-llava-hd-576-576" if next_ else "sv-llava-100-156")
    a.sweep = a.sweep or ("sv-llava-hd-576-576" if next_ else ",".join(LLAVA_15))
    if not all(x.isdigit() and int(x) > 0 for x in a.image_size.split("x")) or (
            a.image_size.count("x") != 1):
        p.error(f"--image-size {a.image_size!r}: height x width in pixels, such as 672x672")
    bad = sorted(set(filter(None, a.skip_parts.split(","))) - set(PARTS))
    if bad:
        p.error(f"--skip-parts {bad}: choose from {', '.join(PARTS)}")
    p.at_least(a, layers=1, threads=1, text=0, batch=1, new_tokens=1, repeats=1, warmup=0)
    for s in [a.preset, *a.sweep.split(",")]:
        r, _, k = s.partition("/")
        if s not in PRESETS and not (r.isdigit() and k.isdigit()):
            p.error(f"{s!r} is neither a preset ({', '.join(PRESETS)}) nor R/S such as 64/156")
    return a


def parse_skip(s: str) -> SkipConfig:
    if s in PRESETS:
        return PRESETS[s]
    r, _, k = s.partition("/")
    return SkipConfig(retained=int(r), skipped=int(k))


def label(skip: SkipConfig) -> str:
    return f"{skip.retained}/{skip.skipped}"


def paper_ratios(texts=(0, 16, 32, 64)) -> dict:
    """Analytic LM prefill FLOPs ratios at the paper's geometries (576 visual tokens, 1 image)
    for several text lengths; the paper prints 25% (100/156) and 60% (256/320)."""
    out = {}
    for lm in ("llama3-8b", "llava-1.5-7b"):
        text, vision = SIZES[lm][:2]
        cfg = LlavaConfig(vision=VisionConfig(**vision), text=TextConfig(**text))
        out[lm] = {name: {t: flops.compare(cfg, t, 1, skip)["prefill"]["ratio"] for t in texts}
                   for name, skip in PRESETS.items() if name in LLAVA_15}
    return out


def run(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    skip_parts = set(filter(None, a.skip_parts.split(",")))
    res = dict(args=vars(a), conditions=lib.conditions(a))
    model = build(a)
    cfg, skip, steps = model.cfg, parse_skip(a.preset), a.new_tokens
    L, sk = cfg.text.num_hidden_layers, label(skip)
    sweep = [] if "sweep" in skip_parts else [parse_skip(s) for s in a.sweep.split(",")]
    size = tuple(int(x) for x in a.image_size.split("x"))
    ids, mask, px, extra = prompt(cfg, a.text, a.batch, a.device, size)
    images = [[size]] * a.batch if cfg.image_grid_pinpoints else [1] * a.batch
    counts = dict(text=[a.text] * a.batch, images=images)
    res["config"] = dict(text=vars(cfg.text) | {"rope": vars(cfg.text.rope)},
                         vision=vars(cfg.vision), image_tokens=cfg.image_seq_length)
    fl = res["flops"] = flops.compare(cfg, **counts, skip=skip, new_tokens=steps + 1,
                                      dtype=DTYPES[a.dtype])
    res["flops_sweep"] = {label(s): flops.compare(cfg, **counts, skip=s) for s in [skip, *sweep]}
    print(f"LM {L} x {cfg.text.hidden_size}, vision {cfg.vision.num_hidden_layers} x "
          f"{cfg.vision.hidden_size}; {a.batch} x ({a.text} text + 1 image): "
          f"{fl['tokens']['plain']} tokens plain, {fl['tokens']['skip']} Skip-Vision {sk}",
          file=sys.stderr)
    with torch.inference_mode():
        inp = {"plain": model.prepare(ids, px, mask, **extra),
               sk: model.prepare(ids, px, mask, skip=skip, **extra)}
        for s in sweep:
            inp.setdefault(label(s), model.prepare(ids, px, mask, skip=s, **extra))
        res["lm_prefill"] = lib.summary(lib.interleaved({n: lm_prefill_case(model, x)
                                                 for n, x in inp.items()}, a), "plain")
        hf = None if "hf" in skip_parts else hf_twin(model, a)
        e2e = {name: (lambda: None, lambda _, s=s: prefill(
            model, model.prepare(ids, px, mask, skip=s, **extra), KVCache(L)))
            for name, s in (("plain", None), (sk, skip))}
        dec = {"plain": decode_case(model, inp["plain"], False, steps),
               "keep": decode_case(model, inp[sk], False, steps),
               "evict": decode_case(model, inp[sk], True, steps)}
        if hf is not None:
            e2e["transformers"] = (lambda: None, lambda _: hf_prefill(hf, ids, px, extra))
            dec["transformers"] = hf_decode_case(hf, ids, px, extra, steps)
            ours = prefill(model, inp["plain"], KVCache(L)).float()
            theirs = hf_prefill(hf, ids, px, extra).logits[:, -1].float()
            res["transformers_max_abs_logit_diff"] = (ours - theirs).abs().max().item()
        res["prefill"] = lib.summary(lib.interleaved(e2e, a), "plain")
        res["decode"] = lib.summary(lib.interleaved(dec, a), "plain", per=steps)
        res["kv_bytes"] = kv_bytes(model, inp["plain"], inp[sk], fl["tokens"]["skipped"] // a.batch)
        if "memory" not in skip_parts:
            res["peak_prefill_bytes"] = {n: lib.peak_bytes(lambda r=r: r(None), a.device)
                                         for n, (_, r) in e2e.items() if n != "transformers"}
    e2e = dec = hf = None  # free transformers' copy before training (a 7B pair would not fit)
    if torch.device(a.device).type == "cuda":
        torch.cuda.empty_cache()
    if "train" not in skip_parts:
        model.train()
        with torch.no_grad():  # autograd cannot save inference tensors
            tin = {"plain": model.prepare(ids, px, mask, **extra),
                   sk: model.prepare(ids, px, mask, skip=skip, **extra)}
        opt = adamw(model.language_model.parameters())
        tr = {name: train_case(model, x, opt) for name, x in tin.items()}
        res["train"] = lib.summary(lib.interleaved(tr, a), "plain")
        if "memory" not in skip_parts:
            res["peak_train_bytes"] = {n: lib.peak_bytes(lambda r=r: r(None), a.device)
                                       for n, (_, r) in tr.items()}
    res["conditions"]["load_average_end"] = os.getloadavg()
    res["paper_ratios"] = paper_ratios()
    kv = res["kv_bytes"]["evict_is_exactly_(n-N_s)/n_of_keep"]
    res["targets"] = {"KV bytes after eviction = (n - N_s) / n of kv keep, exactly":
                      dict(value=kv, ok=kv)}
    res["targets"] |= {f"{k} (wall)": v for k, v in lib.targets(res, sk).items()}
    if torch.device(a.device).type == "cpu":
        res["targets"] |= {f"{k} (CPU time)": v
                           for k, v in lib.targets(res, sk, "cpu_").items()}
    return res


def main(argv=None):
    a = parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device here")
    res = run(a)
    sk = label(parse_skip(a.preset))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = lib.table(res, sk)
    c = res["conditions"]
    head = (f"{c['device']} {c['dtype']} ({c.get('gpu', c['cpu'])}, {c['threads']} threads), "
            f"torch {c['torch']}; load average {c['load_average_start'][0]:.2f} at start, "
            f"{c['load_average_end'][0]:.2f} at end; {a.repeats} repeats after {a.warmup} "
            f"warm-up, interleaved")
    print(head + "\n\n" + text)
    (out / "benchmark.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "benchmark.md").write_text(head + "\n\n" + text + "\n")
    lib.plot(res, out / "benchmark.png")
    print(f"\nwrote {out}/benchmark.json, .md" + ", .png" * (out / "benchmark.png").exists(),
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
