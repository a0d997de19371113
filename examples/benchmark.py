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

from skipvision import KVCache, Llava, LlavaConfig, TextConfig, VisionConfig, flops
from skipvision.generate import decode_step, prefill
from skipvision.skip import PRESETS, SkipConfig

import benchmark_lib as lib  # examples/, next to this file

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
    with torch.device(a.device), lib.default_dtype(DTYPES[a.dtype]), torch.no_grad():
        model = Llava(cfg)  # built in its dtype: a 7B model never exists in float32
        for name, p in model.named_parameters():  # activations of order 1 throughout
            if "norm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            else:
                p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 0.02)
    return model.eval()


def prompt(cfg: LlavaConfig, text: int, batch: int, device):
    """`batch` prompts: text/2 tokens, one image (expanded), text - text/2 tokens."""
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, cfg.image_token_id, (batch, text), generator=g)
    image = torch.full((batch, cfg.image_seq_length), cfg.image_token_id)
    ids = torch.cat([words[:, :text // 2], image, words[:, text // 2:]], 1)
    S = cfg.vision.image_size
    px = torch.randn(batch, 3, S, S, generator=g)
    return ids.to(device), torch.ones_like(ids, dtype=torch.bool), px.to(device)


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
    from skipvision.io.keys import is_ignored, map_key
    cfg = HFLlavaConfig.from_dict(to_hf(model.cfg))
    cfg._attn_implementation = "sdpa"  # transformers' fastest built-in attention on CPU and GPU
    with torch.device(a.device), lib.default_dtype(DTYPES[a.dtype]):
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


def run(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    skip_parts = set(filter(None, a.skip_parts.split(",")))
    res = dict(args=vars(a), conditions=lib.conditions(a))
    model = build(a)
    cfg, skip, steps = model.cfg, parse_skip(a.preset), a.new_tokens
    L, sk = cfg.text.num_hidden_layers, label(skip)
    sweep = [] if "sweep" in skip_parts else [parse_skip(s) for s in a.sweep.split(",")]
    ids, mask, px = prompt(cfg, a.text, a.batch, a.device)
    counts = dict(text=[a.text] * a.batch, images=[1] * a.batch)
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
        inp = {"plain": model.prepare(ids, px, mask), sk: model.prepare(ids, px, mask, skip=skip)}
        for s in sweep:
            inp.setdefault(label(s), model.prepare(ids, px, mask, skip=s))
        res["lm_prefill"] = lib.summary(lib.interleaved({n: lm_prefill_case(model, x)
                                                 for n, x in inp.items()}, a), "plain")
        hf = None if "hf" in skip_parts else hf_twin(model, a)
        e2e = {name: (lambda: None, lambda _, s=s: prefill(
            model, model.prepare(ids, px, mask, skip=s), KVCache(L)))
            for name, s in (("plain", None), (sk, skip))}
        dec = {"plain": decode_case(model, inp["plain"], False, steps),
               "keep": decode_case(model, inp[sk], False, steps),
               "evict": decode_case(model, inp[sk], True, steps)}
        if hf is not None:
            e2e["transformers"] = (lambda: None, lambda _: hf_prefill(hf, ids, px))
            dec["transformers"] = hf_decode_case(hf, ids, px, steps)
            ours = prefill(model, inp["plain"], KVCache(L)).float()
            theirs = hf_prefill(hf, ids, px).logits[:, -1].float()
            res["transformers_max_abs_logit_diff"] = (ours - theirs).abs().max().item()
        res["prefill"] = lib.summary(lib.interleaved(e2e, a), "plain")
        res["decode"] = lib.summary(lib.interleaved(dec, a), "plain", per=steps)
        res["kv_bytes"] = kv_bytes(model, inp["plain"], inp[sk], skip)
        if "memory" not in skip_parts:
            res["peak_prefill_bytes"] = {n: lib.peak_bytes(lambda r=r: r(None), a.device)
                                         for n, (_, r) in e2e.items() if n != "transformers"}
    e2e = dec = hf = None  # free transformers' copy before training (a 7B pair would not fit)
    if torch.device(a.device).type == "cuda":
        torch.cuda.empty_cache()
    if "train" not in skip_parts:
        model.train()
        with torch.no_grad():  # autograd cannot save inference tensors
            tin = {"plain": model.prepare(ids, px, mask),
                   sk: model.prepare(ids, px, mask, skip=skip)}
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


def kv_bytes(model, plain, sv, skip) -> dict:
    """KVCache.nbytes() after prefill: plain, Skip-Vision kept, Skip-Vision evicted."""
    out = {}
    for name, inp, evict in (("plain", plain, False), ("keep", sv, False), ("evict", sv, True)):
        cache = KVCache(model.cfg.text.num_hidden_layers)
        prefill(model, inp, cache)
        if evict:
            cache.keep(~inp.layout.skipped)
        out[name] = cache.nbytes()
    n = sv.embeds.shape[1]  # every row has the same arranged length n and N_s skipped tokens
    out["evict_is_exactly_(n-N_s)/n_of_keep"] = out["evict"] * n == out["keep"] * (
        n - skip.skipped)
    return out


def main(argv=None):
    a = parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
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
    main()
