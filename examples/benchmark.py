"""What Skip-Vision saves, measured side by side in one run: latency, KV cache, memory, FLOPs.

    python examples/benchmark.py                       # CPU-sized LLaVA-1.5 proportions
    python examples/benchmark.py --device cuda --dtype bfloat16 --size llava-1.5-7b

Every comparison is interleaved: each repeat runs every variant once, alternating their order,
after warm-up repeats; CUDA is synchronised before and after each timed call. Reported are
medians, and ratios as the median over repeats of the per-repeat ratio (paired, so slow
moments of a shared machine hit both sides). Measured, against the analytic numbers of
skipvision.flops:
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
import contextlib
import json
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

from skipvision import KVCache, Llava, LlavaConfig, TextConfig, VisionConfig, flops
from skipvision.generate import decode_step, prefill
from skipvision.skip import PRESETS, SkipConfig

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)  # LLaVA-1.5's tower
SIZES = {  # LM (TextConfig fields), vision (VisionConfig fields)
    # LLaVA-1.5-7B at 1/8 of its width (head dim 128 kept) and a quarter of its depth; CLIP-L
    # at 1/4 width: 336 px / 14 px patches = 576 visual tokens, as in LLaVA-1.5.
    "cpu": (dict(vocab_size=4008, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                 num_attention_heads=4, rms_norm_eps=1e-5),
            dict(CLIP_L_336, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=4)),
    "llava-1.5-7b": (dict(vocab_size=32064, rms_norm_eps=1e-5), CLIP_L_336),
    "llama3-8b": (dict(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                       rms_norm_eps=1e-5), CLIP_L_336),  # SV-LLaVA's LM
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="default: cpu")
    p.add_argument("--layers", type=int, help="override the LM's number of layers")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--preset", default="sv-llava-100-156",
                   help="Skip-Vision setting for the detailed comparison: a preset name "
                        f"({', '.join(PRESETS)}) or R/S (default: sv-llava-100-156)")
    p.add_argument("--sweep", default=",".join(PRESETS),
                   help="comma-separated settings for the N_r/N_s plot (default: all presets)")
    p.add_argument("--text", type=int, default=64, help="text tokens in the prompt, around the "
                   "image (default: 64, a LLaVA-1.5 system prompt + question)")
    p.add_argument("--batch", type=int, default=1, help="prompts per batch (default: 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default: 32)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default: 2)")
    p.add_argument("--skip-parts", default="", help="comma-separated parts not to run: "
                   "train, hf, sweep, memory")
    p.add_argument("--out", default="examples/results", help="default: examples/results")
    return p.parse_args(argv)


def parse_skip(s: str) -> SkipConfig:
    if s in PRESETS:
        return PRESETS[s]
    r, _, k = s.partition("/")
    return SkipConfig(retained=int(r), skipped=int(k))


def label(skip: SkipConfig) -> str:
    return f"{skip.retained}/{skip.skipped}"


def build(a) -> Llava:
    text, vision = SIZES[a.size]
    text = dict(text, num_hidden_layers=a.layers or text.get("num_hidden_layers", 32))
    cfg = LlavaConfig(vision=VisionConfig(**vision), text=TextConfig(**text),
                      image_token_id=text["vocab_size"] - 1)
    torch.manual_seed(0)
    with torch.device(a.device), default_dtype(DTYPES[a.dtype]), torch.no_grad():
        model = Llava(cfg)  # built in its dtype: a 7B model never exists in float32
        for name, p in model.named_parameters():  # activations of order 1 throughout
            if "norm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            else:
                p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 0.02)
    return model.eval()


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def prompt(cfg: LlavaConfig, text: int, batch: int, device):
    """`batch` prompts: text/2 tokens, one image (expanded), text - text/2 tokens."""
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, cfg.image_token_id, (batch, text), generator=g)
    image = torch.full((batch, cfg.image_seq_length), cfg.image_token_id)
    ids = torch.cat([words[:, :text // 2], image, words[:, text // 2:]], 1)
    S = cfg.vision.image_size
    px = torch.randn(batch, 3, S, S, generator=g)
    return ids.to(device), torch.ones_like(ids, dtype=torch.bool), px.to(device)


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


def lm_prefill_case(model, inp):
    L = model.cfg.text.num_hidden_layers
    return (lambda: KVCache(L), lambda cache: prefill(model, inp, cache))


def decode_case(model, inp, evict: bool, steps: int):
    """Untimed: prefill (and eviction). Timed: `steps` greedy decode steps."""
    L = model.cfg.text.num_hidden_layers

    def setup():
        cache = KVCache(L)
        logits = prefill(model, inp, cache)
        if evict:
            cache.keep(~inp.layout.skipped)
        return cache, logits.argmax(-1), inp.pos.max(1).values + 1

    def run(state):
        cache, tok, pos = state
        for t in range(steps):
            tok = decode_step(model, tok, pos + t, cache).argmax(-1)
    return setup, run


def train_case(model, inp, opt):
    """One LM training step: forward (logits on every row), loss, backward, AdamW step.
    `inp` must be built outside inference mode (autograd saves its row indices)."""
    lm = model.language_model
    embeds = inp.embeds.detach()
    target = torch.randint(0, model.cfg.text.vocab_size, embeds.shape[:2], device=embeds.device,
                           generator=torch.Generator(embeds.device).manual_seed(0))

    def run(_):
        x = embeds.detach().requires_grad_()  # the projector/embeddings would train in SFT
        h = lm.model(x, inp.pos, inp.horizon, None, inp.ffn_rows)
        loss = torch.nn.functional.cross_entropy(lm.lm_head(h).flatten(0, 1).float(),
                                                 target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (lambda: None), run


def adamw(params):
    """AdamW in torch's fused kernel where it exists (3x faster than the default on CPU)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-6, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-6)


def hf_twin(model, a):
    """transformers' LlavaForConditionalGeneration holding our model's weights, or None."""
    try:
        from transformers import LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration
    except ImportError:
        print("transformers is not installed: skipping the comparison with it", file=sys.stderr)
        return None
    from skipvision import to_hf
    from skipvision.keys import is_ignored, map_key
    cfg = HFLlavaConfig.from_dict(to_hf(model.cfg))
    cfg._attn_implementation = "sdpa"  # transformers' fastest built-in attention on CPU and GPU
    with torch.device(a.device), default_dtype(DTYPES[a.dtype]):
        hf = LlavaForConditionalGeneration(cfg).eval()
    ours = model.state_dict()
    hf.load_state_dict({k: ours[map_key(k)] for k in hf.state_dict() if not is_ignored(k)},
                       strict=True)
    return hf


def hf_prefill(hf, ids, px):
    """transformers' prefill, in its fastest form: no mask (no padding), last logits only."""
    return hf(input_ids=ids, pixel_values=px, use_cache=True, logits_to_keep=1)


def hf_decode_case(hf, ids, px, steps):
    import inspect
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def setup():
        out = hf_prefill(hf, ids, px)
        return getattr(out, name), out.logits[:, -1].argmax(-1)

    def run(state):
        cache, tok = state
        for _ in range(steps):
            out = hf(input_ids=tok[:, None], use_cache=True, logits_to_keep=1, **{name: cache})
            tok = out.logits[:, -1].argmax(-1)
    return setup, run


def paper_ratios(texts=(0, 16, 32, 64)) -> dict:
    """Analytic LM prefill FLOPs ratios at the paper's geometries (576 visual tokens, 1 image)
    for several text lengths; the paper prints 25% (100/156) and 60% (256/320)."""
    out = {}
    for lm in ("llama3-8b", "llava-1.5-7b"):
        text, vision = SIZES[lm]
        cfg = LlavaConfig(vision=VisionConfig(**vision), text=TextConfig(**text))
        out[lm] = {name: {t: flops.compare(cfg, t, 1, skip)["prefill"]["ratio"] for t in texts}
                   for name, skip in PRESETS.items()}
    return out


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


def run(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    skip_parts = set(filter(None, a.skip_parts.split(",")))
    res = dict(args=vars(a), conditions=conditions(a))
    model = build(a)
    cfg, skip = model.cfg, parse_skip(a.preset)
    sweep = [parse_skip(s) for s in a.sweep.split(",")] if "sweep" not in skip_parts else []
    ids, mask, px = prompt(cfg, a.text, a.batch, a.device)
    dtype, steps = DTYPES[a.dtype], a.new_tokens
    res["config"] = dict(text=vars(cfg.text) | {"rope": vars(cfg.text.rope)},
                         vision=vars(cfg.vision), image_tokens=cfg.image_seq_length)
    with torch.inference_mode():
        inp = {"plain": model.prepare(ids, px, mask), label(skip): model.prepare(ids, px, mask,
                                                                                 skip=skip)}
        for s in sweep:
            inp.setdefault(label(s), model.prepare(ids, px, mask, skip=s))
    sk = label(skip)
    fl = flops.compare(cfg, [a.text] * a.batch, [1] * a.batch, skip, steps + 1, dtype)
    res["flops"] = fl
    res["flops_sweep"] = {label(s): flops.compare(cfg, [a.text] * a.batch, [1] * a.batch, s)
                          for s in sweep}
    print(f"model: LM {cfg.text.num_hidden_layers} x {cfg.text.hidden_size} (FFN "
          f"{cfg.text.intermediate_size}, {cfg.text.num_attention_heads}/"
          f"{cfg.text.num_key_value_heads} heads, vocab {cfg.text.vocab_size}); vision "
          f"{cfg.vision.num_hidden_layers} x {cfg.vision.hidden_size}, {cfg.image_seq_length} "
          f"visual tokens; prompt {a.batch} x ({a.text} text + 1 image) = "
          f"{fl['tokens']['plain']} tokens plain, {fl['tokens']['skip']} Skip-Vision {sk}",
          file=sys.stderr)

    with torch.inference_mode():
        cases = {name: lm_prefill_case(model, x) for name, x in inp.items()}
        res["lm_prefill"] = summary(interleaved(cases, a), "plain")
        print("timed: LM prefill", file=sys.stderr)
        hf = None if "hf" in skip_parts else hf_twin(model, a)
        L = cfg.text.num_hidden_layers
        e2e = {"plain": (lambda: None, lambda _: prefill(model, model.prepare(ids, px, mask),
                                                         KVCache(L))),
               sk: (lambda: None, lambda _: prefill(model, model.prepare(ids, px, mask,
                                                                         skip=skip), KVCache(L)))}
        if hf is not None:
            e2e["transformers"] = (lambda: None, lambda _: hf_prefill(hf, ids, px))
            ours = prefill(model, inp["plain"], KVCache(L)).float()
            theirs = hf_prefill(hf, ids, px).logits[:, -1].float()
            res["transformers_max_abs_logit_diff"] = (ours - theirs).abs().max().item()
        res["prefill"] = summary(interleaved(e2e, a), "plain")
        print("timed: prefill end to end", file=sys.stderr)
        dec = {"plain": decode_case(model, inp["plain"], False, steps),
               "keep": decode_case(model, inp[sk], False, steps),
               "evict": decode_case(model, inp[sk], True, steps)}
        if hf is not None:
            dec["transformers"] = hf_decode_case(hf, ids, px, steps)
        res["decode"] = summary(interleaved(dec, a), "plain", per=steps)
        print("timed: decode", file=sys.stderr)
        kv = {}
        for name, x, evict in (("plain", inp["plain"], False), ("keep", inp[sk], False),
                               ("evict", inp[sk], True)):
            cache = KVCache(L)
            prefill(model, x, cache)
            if evict:
                cache.keep(~x.layout.skipped)
            kv[name] = cache.nbytes()
        n, n_s = fl["tokens"]["skip"], fl["tokens"]["skipped"]
        res["kv_bytes"] = dict(kv, analytic=fl["kv_bytes"],
                               evict_is_exactly_n_minus_ns_over_n=kv["evict"] * n == kv["keep"]
                               * (n - n_s) and a.batch == 1)
        if "memory" not in skip_parts:
            res["peak_prefill_bytes"] = {
                "plain": peak_bytes(lambda: e2e["plain"][1](None), a.device),
                sk: peak_bytes(lambda: e2e[sk][1](None), a.device)}
    if "train" not in skip_parts:
        model.train()
        with torch.no_grad():
            tin = {"plain": model.prepare(ids, px, mask),
                   sk: model.prepare(ids, px, mask, skip=skip)}
        opt = adamw(model.language_model.parameters())
        tr = {name: train_case(model, x, opt) for name, x in tin.items()}
        res["train"] = summary(interleaved(tr, a), "plain")
        print("timed: training step", file=sys.stderr)
        if "memory" not in skip_parts:
            res["peak_train_bytes"] = {name: peak_bytes(lambda r=r: r(None), a.device)
                                       for name, (_, r) in tr.items()}
        model.eval()
    res["conditions"]["load_average_end"] = os.getloadavg()
    res["paper_ratios"] = paper_ratios()
    kv = res["kv_bytes"]["evict_is_exactly_n_minus_ns_over_n"]
    res["targets"] = {"KV bytes after eviction = (n - N_s) / n of kv keep, exactly":
                      dict(value=kv, ok=kv)}
    res["targets"] |= {f"{k} (wall)": v for k, v in targets(res, sk).items()}
    if torch.device(a.device).type == "cpu":
        res["targets"] |= {f"{k} (CPU time)": v for k, v in targets(res, sk, "cpu_").items()}
    return res


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
                 f"threads; prompt of {res['flops']['tokens']['plain']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv=None):
    a = parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    res = run(a)
    sk = label(parse_skip(a.preset))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(res, sk)
    c = res["conditions"]
    head = (f"{c['device']} {c['dtype']} ({c.get('gpu', c['cpu'])}, {c['threads']} threads), "
            f"torch {c['torch']}; load average {c['load_average_start'][0]:.2f} at start, "
            f"{c['load_average_end'][0]:.2f} at end; {a.repeats} repeats after {a.warmup} "
            f"warm-up, interleaved")
    print(head + "\n\n" + text)
    (out / "benchmark.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "benchmark.md").write_text(head + "\n\n" + text + "\n")
    plot(res, out / "benchmark.png")
    print(f"\nwrote {out}/benchmark.json, .md" + ", .png" * (out / "benchmark.png").exists(),
          file=sys.stderr)


if __name__ == "__main__":
    main()
