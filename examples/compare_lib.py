"""Helpers of examples/compare_methods.py: the methods at a budget, their costs measured on
one prompt (FLOPs counted, times interleaved), and the plot."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

import benchmark_lib as lib  # examples/, next to this file
from skipvision.analysis.flops import counted_prefill, counted_prepare
from skipvision.generate import decode_step, prefill
from skipvision.kv_cache import KVCache
from skipvision.pruning import Prune
from skipvision.skip import SkipConfig

METHODS = ("random", "visionzip", "divprune", "fastv", "fastv K=1", "dart", "dart K=1",
           "skip-vision", "skip-vision fine-tuned")  # fastv, dart: the papers' K = 2


def policy(method: str, budget: int, n_image: int, shipped: SkipConfig):
    """The token policy of `method` keeping `budget` of an image's `n_image` tokens in full
    (FFN and KV cache). Skip-Vision: N_r = budget - 2 (+ its 2 summary tokens), and N_s
    merged tokens in the shipped model's proportion (39 of 144), which skip the FFN and leave
    the cache after prefill."""
    if method.startswith("skip-vision"):
        n_s = round(n_image * shipped.skipped / 144)
        return SkipConfig(retained=budget - 2, skipped=min(n_s, n_image - budget + 2),
                          summary=True, kv=shipped.kv, merge_order=shipped.merge_order)
    method, _, k = method.partition(" K=")
    return Prune(method, budget, layer=int(k or 2))


@torch.inference_mode()
def costs(model, ids, px, mask, policies: dict, a) -> dict:
    """name -> FLOPs, KV bytes and median times (prepare; LM prefill; one decode step), all
    cases interleaved in one run; ratios are to "plain" in the same repeat."""
    L, out, cases = model.cfg.text.num_hidden_layers, {}, {}
    for name, skip in policies.items():
        inp, prepare_flops = counted_prepare(model, ids, px, mask, skip=skip)
        flops, kv = counted_prefill(model, inp, skip)
        out[name] = dict(tokens=inp.embeds.shape[1], lm_prefill_flops=flops, kv_bytes=kv,
                         prepare_flops=prepare_flops)
        cases[name + "|prepare"] = (lambda: None,
                                    lambda _, s=skip: model.prepare(ids, px, mask, skip=s))
        cases[name + "|prefill"] = (lambda: KVCache(L), lambda c, i=inp, s=skip: _prefill(
            model, i, c, s))
        cases[name + "|decode"] = (lambda i=inp, s=skip: _ready(model, i, s),
                                   lambda st: _decode(model, st, a.decode_steps))
    times = lib.interleaved(cases, SimpleNamespace(warmup=a.warmup, repeats=a.repeats,
                                                   device="cpu"))
    for part, per in (("prepare", 1), ("prefill", 1), ("decode", a.decode_steps)):
        res = lib.summary({n.split("|")[0]: t for n, t in times.items()
                           if n.endswith("|" + part)}, "plain", per)
        for name, r in res.items():
            out[name][part] = {k: r[k] for k in ("median_s", "ratio", "cpu_median_s",
                                                 "cpu_ratio")}
    base = out["plain"]
    for r in out.values():
        r["lm_prefill_flops_ratio"] = r["lm_prefill_flops"] / base["lm_prefill_flops"]
        r["kv_ratio"] = r["kv_bytes"] / base["kv_bytes"]
    return out


def _prefill(model, inp, cache, skip):
    logits = prefill(model, inp, cache)
    if inp.layout is not None and skip.kv == "evict":
        cache.keep(~inp.layout.is_skipped)
    return logits


def _ready(model, inp, skip):
    cache = KVCache(model.cfg.text.num_hidden_layers)
    tok = _prefill(model, inp, cache, skip).argmax(-1)
    return cache, tok, inp.pos.max(1).values + 1


def _decode(model, state, steps: int):
    cache, tok, pos = state
    for t in range(steps):
        tok = decode_step(model, tok, pos + t, cache).argmax(-1)


def plot(rows: list[dict], path, clock: str = "ratio") -> bool:
    """Accuracy against measured LM prefill time (fraction of plain's), one line a method,
    for the shipped model (left) and the 576-token geometry (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, geo in zip(axes, ("shipped", "576")):
        for method in METHODS:
            pts = sorted((r[geo]["prefill"][clock], r["accuracy"], r["budget"]) for r in rows
                         if r["method"] == method and geo in r)
            if pts:
                line, = ax.plot([t for t, _, _ in pts], [a for _, a, _ in pts], "o-",
                                label=method)
                for t, acc, b in pts:
                    ax.annotate(str(b), (t, acc), textcoords="offset points", xytext=(3, 3),
                                fontsize=6, color=line.get_color())
        plain = next(r for r in rows if r["method"] == "plain")
        ax.plot([1.0], [plain["accuracy"]], "k*", markersize=12, label="plain (all tokens)")
        where = "shipped model" if geo == "shipped" else "576 image tokens, random weights"
        ax.set_xlabel(f"LM prefill time / plain ({where})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match, 1,000 held-out questions")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
