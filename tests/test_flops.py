"""skipvision.analysis.flops against what torch.utils.flop_counter.FlopCounterMode counts, exactly.

On CPU, SDPA runs the kernel aten._scaled_dot_product_flash_attention_for_cpu, for which torch
registers no FLOP formula: FlopCounterMode counts its attention as 0 (checked below). So the
attention is counted two ways, and both must equal the analytic numbers: (a) under the math
SDPA backend, whose decomposition's bmm's FlopCounterMode counts itself; (b) on the CPU kernel
with torch's own formula for its GPU SDPA kernels (`sdpa_flop_count`) mapped onto it.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from helpers import llava_inputs
from skipvision import KVCache, LlavaConfig, TextConfig, VisionConfig, flops
from skipvision.generate import decode_step, prefill
from skipvision.skip import PRESETS
from strategies import models, skips

aten = torch.ops.aten
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu:  # torch's formula, GPU kernels
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def counted(fn, backend: str):
    """(FLOPs FlopCounterMode counts while running fn, fn's result)."""
    if backend == "math":
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
            out = fn()
    else:
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as c:
            out = fn()
    return c.get_total_flops(), out


@settings(max_examples=25)
@given(m=models(dtype=torch.float32), data=st.data(), backend=st.sampled_from(["math", "cpu-kernel"]),
       rows=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 2)), min_size=1, max_size=3))
def test_generation_flops_equal_flop_counter(m, data, backend, rows):
    """Vision side, prefill, every decode step and the KV bytes, plain and Skip-Vision."""
    model, seed = m
    cfg = model.cfg
    skip = data.draw(st.none() | skips(cfg), label="skip")
    text, images = [t for t, _ in rows], [i for _, i in rows]
    ids, mask, _, px = llava_inputs(cfg, seed, text, images, torch.float32)
    with torch.no_grad():
        got, inp = counted(lambda: model.prepare(ids, px, mask, skip=skip), backend)
        assert got == flops.vision(cfg, sum(images), skip)["total"] * (sum(images) > 0)
        g = flops.geometry_of(inp, cfg)
        assert g == flops.geometry(cfg, text, images, skip)
        cache = KVCache(cfg.text.num_hidden_layers)
        got, logits = counted(lambda: prefill(model, inp, cache), backend)
        assert got == flops.prefill(cfg, g)["total"]
        assert cache.nbytes() == flops.kv_bytes(cfg, g.batch, g.cache_slots(), torch.float32)
        evict = skip is not None and skip.kv == "evict"
        if evict:
            cache.keep(~inp.layout.is_skipped)
        assert cache.nbytes() == flops.kv_bytes(cfg, g.batch, g.cache_slots(evict))
        pos = inp.pos.max(1).values + 1
        for step in range(3):
            tok = logits.argmax(-1)
            got, logits = counted(lambda: decode_step(model, tok, pos + step, cache), backend)
            assert got == flops.decode_step(cfg, g, step, evict)["total"]
        assert cache.nbytes() == flops.kv_bytes(cfg, g.batch, g.cache_slots(evict) + 3)


@settings(max_examples=15)
@given(m=models(dtype=torch.float32), data=st.data(),
       rows=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 2)), min_size=1, max_size=2))
def test_forward_and_training_flops_equal_flop_counter(m, data, rows):
    """Llava.forward (all logits) = vision + prefill(logits="all"); a training step's
    forward + backward of the LM = 3 x its forward (math backend: autograd's bmm's are counted)."""
    model, seed = m
    cfg = model.cfg
    skip = data.draw(st.none() | skips(cfg), label="skip")
    text, images = [t for t, _ in rows], [i for _, i in rows]
    ids, mask, _, px = llava_inputs(cfg, seed, text, images, torch.float32)
    g = flops.geometry(cfg, text, images, skip)
    with torch.no_grad():
        got, _ = counted(lambda: model(ids, px, mask, skip=skip), "math")
    want = flops.vision(cfg, sum(images), skip)["total"] * (sum(images) > 0)
    assert got == want + flops.prefill(cfg, g, logits="all")["total"]
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
    inp.embeds = inp.embeds.detach().requires_grad_()

    def step():
        model.logits(model.run(inp)).square().mean().backward()
    got, _ = counted(step, "math")
    assert got == flops.training_step(cfg, g)["total"]


def test_flop_counter_counts_no_attention_on_the_cpu_kernel():
    """Why the tests above need the math backend or a formula: the CPU kernel counts 0."""
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    with FlopCounterMode(display=False) as c:
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
    got, _ = counted(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k), "math")
    assert c.get_total_flops() == 0 and got == 4 * 2 * 3 * 5 * 4


@given(m=models(dtype=torch.float32))
def test_weights_read_are_the_lm_parameters(m):
    model, _ = m
    lm = model.language_model
    n = sum(p.numel() for p in lm.model.layers.parameters()) + lm.model.norm.weight.numel()
    assert flops.lm_weight_params(model.cfg.text) == n + lm.lm_head.weight.numel()


@given(text=st.integers(0, 200), images=st.integers(1, 3),
       preset=st.sampled_from(sorted(k for k, v in PRESETS.items() if v.retain != "thumbnail")))
def test_eviction_keeps_exactly_the_unskipped_fraction(text, images, preset):
    """KV bytes after Skip-KV = (n - skipped) / n of the un-evicted cache, n the arranged length."""
    cfg = paper_cfg("llava-1.5-7b")
    skip = PRESETS[preset]
    c = flops.compare(cfg, text, images, skip)
    n, s = c["tokens"]["skip"], c["tokens"]["skipped"]
    assert s == images * skip.skipped
    assert c["kv_bytes"]["evict"] * n == c["kv_bytes"]["keep"] * (n - s)
    assert c["kv_bytes"]["plain"] * n == c["kv_bytes"]["keep"] * c["tokens"]["plain"]


CLIP_L_336 = VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, image_size=336, patch_size=14)  # llava-hf/llava-1.5-7b-hf config.json
PAPER_LMS = {  # LLaMA3-8B (Meta-Llama-3-8B config.json); Vicuna-7B v1.5 (llava-1.5-7b-hf config.json)
    "llama3-8b": TextConfig(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8),
    "llava-1.5-7b": TextConfig(vocab_size=32064, rms_norm_eps=1e-5),
}


def paper_cfg(name: str) -> LlavaConfig:
    return LlavaConfig(vision=CLIP_L_336, text=PAPER_LMS[name])


@pytest.mark.parametrize("lm, text, preset, paper", [
    ("llama3-8b", 32, "sv-llava-100-156", 0.25),  # paper: FLOPs to 25%
    ("llama3-8b", 32, "sv-llava-256-320", 0.60),  # paper: FLOPs to 60%
    ("llava-1.5-7b", 8, "sv-llava-100-156", 0.25),
])
def test_paper_flops_ratios(lm, text, preset, paper):
    """The paper's ratios (LM prefill, vision encoder excluded) at 576 visual tokens."""
    cfg = paper_cfg(lm)
    assert cfg.image_seq_length == 576
    ratio = flops.compare(cfg, text, 1, preset)["prefill"]["ratio"]
    assert abs(ratio - paper) <= 0.03, f"{lm} {preset} at {text} text tokens: {ratio:.3f}"


@settings(max_examples=15)
@given(m=models(), rows=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 2)), min_size=1,
                                 max_size=3), data=st.data())
def test_causal_fast_path_equals_the_explicit_mask(m, rows, data):
    """Without padding, a fresh prefill runs SDPA's is_causal instead of the (B, 1, T, S) mask
    (llama.is_plain_causal); same outputs in float64, and the rule picks it exactly then."""
    from skipvision import llama
    model, seed = m
    skip = data.draw(st.none() | skips(model.cfg), label="skip")
    text, images = [t for t, _ in rows], [i for _, i in rows]
    ids, mask, _, px = llava_inputs(model.cfg, seed, text, images)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
        fast = model.run(inp)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llama, "is_plain_causal", lambda pos, horizon: False)
            slow = model.run(inp)
    assert torch.allclose(fast, slow, rtol=0, atol=1e-12)
    padded = not bool(inp.attention_mask.all())
    consistent = skip is not None and skip.mask == "consistent" and sum(images) > 0 and bool(
        (inp.horizon < torch.iinfo(torch.int64).max).any())
    assert llama.is_plain_causal(inp.pos, inp.horizon) == (not padded and not consistent)
