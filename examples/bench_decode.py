"""Generation against the hardware's limit: our decode and prefill paths beside transformers',
and the machine's own memory bandwidth and matrix-multiply throughput, in one run.

    python examples/bench_decode.py                      # benchmark.py's "cpu" model, 1 thread
    python examples/bench_decode.py --no-smollm2 --repeats 3

Paths (same weights, greedy, interleaved, medians): ours eager (the growing KVCache), a static
KV cache (skipvision/fast), static + fused projections, static + fused + a compiled decode
step (torch.compile), and transformers' LlavaForConditionalGeneration (SDPA). Each decode path
is also reported as achieved bytes/s (weights + KV read per step, over the step's time) as a
fraction of the copy bandwidth; prefill as FLOP/s over the matrix-product throughput. With the
real SmolLM2-135M weights (the GGUF the tests use) the same is measured for its decoder.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

import benchmark_lib as lib  # examples/, next to this file
from benchmark_cases import SIZES, build, hf_decode_case, hf_prefill, hf_twin, prompt
from cli import Parser, fail, run_main

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="cpu", choices=[s for s in SIZES if "next" not in s],
                   help="benchmark.py's model size (LLaVA-1.5 geometries; default: cpu)")
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled step")
    p.add_argument("--no-smollm2", action="store_true", help="leave out the real weights")
    p.add_argument("--out", default=str(ROOT / "examples" / "results" / "decode"))
    a = p.parse_args(argv)
    p.at_least(a, text=1, new_tokens=1, repeats=1, threads=1, warmup=0)
    return a


def decode_case(model, inp, steps: int, static: bool, step):
    """Untimed: prefill into a fresh cache. Timed: `steps` greedy decode steps."""
    from skipvision import fast
    from skipvision.generate import prefill
    from skipvision.kv_cache import KVCache
    L = model.cfg.text.num_hidden_layers

    def setup():
        cache = fast.StaticKVCache(L, steps) if static else KVCache(L)
        return cache, prefill(model, inp, cache).argmax(-1), inp.pos.max(1).values + 1

    def run(state):
        cache, tok, pos = state
        for t in range(steps):
            tok = step(model, tok, pos + t, cache).argmax(-1)
    return setup, run


@torch.inference_mode()
def measure(model, ids, mask, px, a, hf=None) -> dict:
    """Prefill and decode through each of our paths and (if given) transformers', interleaved;
    ratios to transformers (or to ours eager), and the roofline fractions."""
    from skipvision import fast
    from skipvision.analysis.flops import counted_prefill
    from skipvision.analysis.roofline import decode_step_bytes
    from skipvision.generate import decode_step, prefill
    from skipvision.kv_cache import KVCache
    L = model.cfg.text.num_hidden_layers
    fused = fast.fuse(type(model)(model.cfg).eval())
    fused.load_state_dict(model.state_dict())
    ways = {"ours": (model, False, decode_step), "ours static": (model, True, decode_step),
            "ours static fused": (fused, True, decode_step)}
    if not a.no_compile:
        ways["ours static fused compiled"] = (fused, True, fast.compiled_step())
    inp = model.prepare(ids, px, mask)
    pre = {k: (lambda: KVCache(L), lambda c, m=m: prefill(m, inp, c))
           for k, m in (("ours", model), ("ours fused", fused))}
    dec = {k: decode_case(m, inp, a.new_tokens, s, st) for k, (m, s, st) in ways.items()}
    if hf is not None:
        pre["transformers"] = (lambda: None, lambda _: hf_prefill(hf, ids, px, {}))
        dec["transformers"] = hf_decode_case(hf, ids, px, {}, a.new_tokens)
    base = "transformers" if hf is not None else "ours"
    res = dict(prefill=lib.summary(lib.interleaved(pre, a), base),
               decode=lib.summary(lib.interleaved(dec, a), base, per=a.new_tokens))
    flops, _ = counted_prefill(model, inp)
    for r in res["prefill"].values():
        r["flop_per_s"] = flops / r["median_s"]
        r["matmul_fraction"] = r["flop_per_s"] / a.matmul
    res["gemv_floor_s"] = gemv_floor(model, a)
    cache = KVCache(L)
    prefill(model, inp, cache)
    per_slot = cache.nbytes() // len(cache)
    # what the middle step must read: every weight, and the cache up to that step
    need = decode_step_bytes(model, cache) + per_slot * (a.new_tokens // 2)
    for r in res["decode"].values():
        r["bytes_per_step"] = need
        r["bandwidth_fraction"] = need / r["median_s"] / a.bandwidth
    return res


def gemv_floor(model, a) -> float:
    """Median seconds of the decode step's matrix-vector products alone (every LM linear
    layer and the LM head on one token, as the step calls them): what any implementation on
    these kernels spends before attention, norms or Python."""
    lin = [m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    x = {m.in_features: torch.randn(1, 1, m.in_features) for m in lin}

    def run(_):
        for m in lin:
            m(x[m.in_features])
    times = lib.interleaved({"gemv": (lambda: None, run)}, a)
    return lib.summary(times, "gemv")["gemv"]["median_s"]


def smollm2(a) -> dict:
    """Decode with the real SmolLM2-135M weights (text only) through our paths."""
    from skipvision import Llava, LlavaConfig, VisionConfig
    from skipvision.io.gguf import load_gguf
    lm = load_gguf(dtype=torch.float32)
    model = Llava(LlavaConfig(vision=VisionConfig(hidden_size=8, intermediate_size=8,
                                                  num_hidden_layers=1, num_attention_heads=1),
                              text=lm.cfg, image_token_id=lm.cfg.vocab_size - 1))
    model.language_model = lm
    model.eval()
    ids = torch.randint(0, lm.cfg.vocab_size - 1, (1, a.text + 576),
                        generator=torch.Generator().manual_seed(0))
    return measure(model, ids, torch.ones_like(ids, dtype=torch.bool), None, a)


def main(argv=None):
    a = parse_args(argv)
    from skipvision.analysis.roofline import matmul_throughput, memory_bandwidth
    torch.set_num_threads(a.threads)
    a.device, a.dtype = "cpu", "float32"
    a.bandwidth, a.matmul = memory_bandwidth(), matmul_throughput()
    model = build(SimpleNamespace(size=a.size, layers=None, device="cpu", dtype="float32"))
    ids, mask, px, _ = prompt(model.cfg, a.text, 1, "cpu")
    hf = hf_twin(model, a)
    if hf is None:
        fail("transformers is not installed: nothing to compare with")
    res = dict(conditions=lib.conditions(a), bandwidth_bytes_per_s=a.bandwidth,
               matmul_flop_per_s=a.matmul, benchmark=measure(model, ids, mask, px, a, hf))
    if not a.no_smollm2:
        res["smollm2"] = smollm2(a)
    res["bandwidth_end"], res["matmul_end"] = memory_bandwidth(), matmul_throughput()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(res, indent=1))
    md = table(res, a)
    (out / "decode.md").write_text(md + "\n")
    print(md)
    return res


def table(res: dict, a) -> str:
    rows = [f"Copy bandwidth {res['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s "
            f"({res['bandwidth_end'] / 1e9:.2f} at the end), matmul "
            f"{res['matmul_flop_per_s'] / 1e9:.1f} GFLOP/s ({res['matmul_end'] / 1e9:.1f}); "
            f"{a.threads} thread(s), {a.repeats} repeats", "",
            "| model | path | prefill ms | prefill / base | of matmul peak | decode ms/token "
            "| decode / base | bytes/step (MB) | of bandwidth |", "|---" * 9 + "|"]
    for name in ("benchmark", "smollm2"):
        if name not in res:
            continue
        pre, dec = res[name]["prefill"], res[name]["decode"]
        rows.append(f"| {name} | matrix-vector products alone | - | - | - | "
                    f"{res[name]['gemv_floor_s'] * 1e3:.2f} | "
                    f"{res[name]['gemv_floor_s'] / dec['ours']['median_s']:.3f} of ours | - | "
                    f"{dec['ours']['bytes_per_step'] / res[name]['gemv_floor_s'] / a.bandwidth:.2f}"
                    " |")
        for k, d in dec.items():
            p = pre.get(k)
            rows.append(f"| {name} | {k} | "
                        + (f"{p['median_s'] * 1e3:.1f} | {p['ratio']:.3f} | "
                           f"{p['matmul_fraction']:.2f}" if p else "- | - | -")
                        + f" | {d['median_s'] * 1e3:.2f} | {d['ratio']:.3f} | "
                        + (f"{d['bytes_per_step'] / 1e6:.1f} | {d['bandwidth_fraction']:.2f} |"
                           if "bytes_per_step" in d else "- | - |"))
    return "\n".join(rows)


if __name__ == "__main__":
    run_main(main)
