"""Helpers of examples/benchmark.py: interleaved timing, peak memory, conditions, and the
table, targets and plot it reports."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: dict, a) -> dict:
    """cases: name -> (setup, run). run(setup()) is timed; every repeat runs every case once,
    the order reversed on odd repeats. Returns name -> {"wall": [s, ...], "cpu": [s, ...]}:
    wall-clock and this process's CPU time (on CPU with --threads 1, CPU time is the time
    the call computed, whatever else the machine ran meanwhile)."""
    times = {name: dict(wall=[], cpu=[]) for name in cases}
    names = list(cases)
    for i in range(a.warmup + a.repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            setup, run = cases[name]
            state = setup()
            sync(a.device)
            t0, c0 = time.perf_counter(), time.process_time()
            run(state)
            sync(a.device)
            if i >= a.warmup:
                times[name]["wall"].append(time.perf_counter() - t0)
                times[name]["cpu"].append(time.process_time() - c0)
    return times


def summary(times: dict, base: str, per: int = 1) -> dict:
    """Per case and clock: median seconds (divided by `per`), the median over repeats of the
    ratio to `base` in the same repeat, and the raw seconds."""
    out = {}
    for name, clocks in times.items():
        out[name] = {}
        for clock, t in clocks.items():
            pre = "" if clock == "wall" else "cpu_"
            out[name][pre + "median_s"] = statistics.median(t) / per
            out[name][pre + "ratio"] = statistics.median(
                x / y for x, y in zip(t, times[base][clock]))
            out[name][pre + "times_s"] = [x / per for x in t]
    return out


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created during a call and alive at once (any device).

    Storages that existed before (weights, optimizer state) are not counted; a storage stays
    counted while anything holds it, autograd's saved tensors included.
    """

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def _free(self, key, nbytes):
        self.live.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = (st.device, st.data_ptr())
            if st.nbytes() == 0 or key in self.live or key[1] in inputs:
                continue
            self.live.add(key)
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(st, self._free, key, st.nbytes())
        return out


def peak_bytes(fn, device) -> int:
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakMemory() as m:
        fn()
    return m.peak


def conditions(a) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = dict(device=a.device, dtype=a.dtype, threads=torch.get_num_threads(),
               cpu=cpu, cores=os.cpu_count(), torch=torch.__version__,
               python=platform.python_version(), load_average_start=os.getloadavg())
    if torch.device(a.device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(a.device)
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def targets(res: dict, sk: str, clock: str = "") -> dict:
    """The claims this benchmark checks, with measured values and verdicts (clock "" = wall,
    "cpu_" = CPU time)."""
    fl, out, r = res["flops"], {}, clock + "ratio"
    t = res["lm_prefill"][sk][r] / fl["prefill"]["ratio"]
    out["LM prefill time ratio / FLOPs ratio <= 1.15"] = dict(value=t, ok=t <= 1.15)
    if "train" in res:
        t = res["train"][sk][r] / fl["train"]["ratio"]
        out["training step time ratio / FLOPs ratio <= 1.15"] = dict(value=t, ok=t <= 1.15)
    for part in ("prefill", "decode"):
        if "transformers" in res[part]:
            v = 1 / res[part]["transformers"][r]  # ours / theirs, paired per repeat
            out[f"ours / transformers, {part} <= 1.0"] = dict(value=v, ok=v <= 1.0)
    return out


def table(res: dict, sk: str) -> str:
    fl, ms, mib = res["flops"], 1e3, 1 / 2**20
    cpu = res["conditions"]["device"] == "cpu"
    rows = [f"| measured (medians) | plain | Skip-Vision {sk} | ratio, wall "
            + "| ratio, CPU time " * cpu + "| analytic ratio |", "|---" * (5 + cpu) + "|"]

    def line(what, part, a, b, scale, unit, analytic):
        d = res[part]
        rows.append(f"| {what} | {d[a]['median_s'] * scale:.1f} {unit} | "
                    f"{d[b]['median_s'] * scale:.1f} {unit} | {d[b]['ratio']:.3f} | "
                    + f"{d[b]['cpu_ratio']:.3f} | " * cpu + f"{analytic} |")
    line("LM prefill", "lm_prefill", "plain", sk, ms, "ms",
         f"{fl['prefill']['ratio']:.3f} (FLOPs)")
    e2e = (fl["prefill"]["skip"] + fl["vision"]["skip"]) / (fl["prefill"]["plain"]
                                                            + fl["vision"]["plain"])
    line("prefill, vision included", "prefill", "plain", sk, ms, "ms", f"{e2e:.3f} (FLOPs)")
    dec, rd = fl["decode"], fl["decode_bytes"]
    for kv in ("keep", "evict"):
        line(f"decode / token, kv {kv}", "decode", "plain", kv, ms, "ms",
             f"{dec[kv] / dec['plain']:.3f} (FLOPs), {rd[kv] / rd['plain']:.3f} (bytes read)")
    if "train" in res:
        line("training step (LM)", "train", "plain", sk, ms, "ms",
             f"{fl['train']['ratio']:.3f} (FLOPs)")
    kv, gap = res["kv_bytes"], "| " * cpu
    rows.append(f"| KV cache after prefill | {kv['plain'] * mib:.2f} MiB | keep "
                f"{kv['keep'] * mib:.2f} / evict {kv['evict'] * mib:.2f} MiB | "
                f"{kv['keep'] / kv['plain']:.3f} / {kv['evict'] / kv['plain']:.3f} | {gap}"
                f"{fl['kv_bytes']['keep'] / fl['kv_bytes']['plain']:.3f} / "
                f"{fl['kv_bytes']['evict'] / fl['kv_bytes']['plain']:.3f} (bytes) |")
    for part, what in (("peak_prefill_bytes", "peak memory, prefill"),
                       ("peak_train_bytes", "peak memory, training step")):
        if part in res:
            p, s = res[part]["plain"], res[part][sk]
            rows.append(f"| {what} | {p * mib:.1f} MiB | {s * mib:.1f} MiB | {s / p:.3f} | "
                        f"{gap}|")
    if "transformers" in res["prefill"]:
        rows += ["", "| ours (plain) vs transformers | ours | transformers | ours / theirs, "
                 "wall |" + " ours / theirs, CPU time |" * cpu, "|---" * (4 + cpu) + "|"]
        for part, per in (("prefill", "prefill, vision included"), ("decode", "decode / token")):
            d = res[part]
            rows.append(f"| {per} | {d['plain']['median_s'] * ms:.1f} ms | "
                        f"{d['transformers']['median_s'] * ms:.1f} ms | "
                        f"{1 / d['transformers']['ratio']:.3f} |"
                        + f" {1 / d['transformers']['cpu_ratio']:.3f} |" * cpu)
    pr = res["paper_ratios"]
    texts = list(next(iter(next(iter(pr.values())).values())))
    rows += ["", "LM prefill FLOPs, Skip-Vision / plain, at the paper's geometry (576 visual "
             "tokens), by text tokens:", "",
             "| LM | setting | " + " | ".join(f"{t} text" for t in texts) + " |",
             "|---|---" + "|---" * len(texts) + "|"]
    for lm, by_preset in pr.items():
        for name, by_text in by_preset.items():
            rows.append(f"| {lm} | {name} | "
                        + " | ".join(f"{v:.1%}" for v in by_text.values()) + " |")
    rows += ["", "| target | value | met |", "|---|---|---|"]
    for name, t in res["targets"].items():
        v = t["value"] if isinstance(t["value"], bool) else f"{t['value']:.3f}"
        rows.append(f"| {name} | {v} | {'yes' if t['ok'] else 'NO'} |")
    return "\n".join(rows)


def plot(res: dict, path: Path) -> bool:
    """Left: LM prefill time (bars) and FLOPs (dots, right axis scaled so that plain's dot sits
    on plain's bar: a bar below its dot ran faster per FLOP than plain). Right: ratios."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    names = sorted((n for n in res["flops_sweep"] if n in res["lm_prefill"]),
                   key=lambda n: tuple(map(int, n.split("/"))))
    lm, fs = res["lm_prefill"], res["flops_sweep"]
    n_img = res["config"]["image_tokens"]
    ms = [lm["plain"]["median_s"] * 1e3] + [lm[n]["median_s"] * 1e3 for n in names]
    gf = [fs[names[0]]["prefill"]["plain"] / 1e9] + [fs[n]["prefill"]["skip"] / 1e9
                                                     for n in names]
    x = list(range(len(ms)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(x, ms, 0.6, color=["0.6"] + ["tab:blue"] * len(names), label="time (median)")
    ax1.set_ylabel("LM prefill, ms")
    ax1.set_xticks(x, [f"plain\n{n_img} tokens"] + names)
    ax1.set_xlabel("N_r / N_s")
    twin = ax1.twinx()
    twin.plot(x, gf, "o", color="tab:orange", label="GFLOPs (analytic)")
    twin.set_ylim(0, ax1.get_ylim()[1] * gf[0] / ms[0])
    twin.set_ylabel("LM prefill, GFLOPs")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax2.plot(x[1:], [lm[n]["ratio"] for n in names], "o-", label="time (median paired ratio)")
    ax2.plot(x[1:], [fs[n]["prefill"]["ratio"] for n in names], "s--", label="FLOPs")
    ax2.set_xticks(x[1:], names)
    ax2.set_xlabel("N_r / N_s")
    ax2.set_ylabel("Skip-Vision / plain, LM prefill")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    c = res["conditions"]
    fig.suptitle(f"{c['device']} {c['dtype']}, {c.get('gpu', c['cpu'])}, {c['threads']} "
                 f"threads; {res['args']['batch']} x {res['flops']['tokens']['plain']} prompt "
                 "tokens (plain)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
