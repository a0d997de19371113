"""Skip-Vision HD on LLaVA-NeXT through the seam: the thumbnail retained, the tiles merged,
summary tokens, Skip-FFN, Skip-KV; against the dense oracle (reference/dense.py, which builds
the tiles' features token by token), and FLOPs exactly as FlopCounterMode counts them."""
import torch
from hypothesis import assume, given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_close, next_inputs
from next_configs import REAL
from reference import dense
from skipvision import KVCache, SkipConfig, anyres, flops, from_hf, generate
from skipvision.generate import decode_step, prefill
from strategies import image_sizes, next_models


@st.composite
def hd_skips(draw, model, **fixed):
    """The paper's HD split (thumbnail retained) or CLS attention across all tiles."""
    g2 = model.cfg.image_seq_length  # the base tile's tokens
    kw = dict(retain=draw(st.sampled_from(["thumbnail", "cls_attention"]), label="retain"),
              skipped=draw(st.integers(1, 2 * g2 + 3), label="skipped"),
              summary=draw(st.booleans()), mask=draw(st.sampled_from(["causal", "consistent"])),
              kv=draw(st.sampled_from(["evict", "keep"])),
              merge_order=draw(st.sampled_from(["redundancy", "spatial"])))
    kw["retained"] = g2 if kw["retain"] == "thumbnail" else draw(st.integers(1, g2), label="r")
    return SkipConfig(**(kw | fixed))


def tile_tokens(cfg, h: int, w: int) -> int:
    """The tiles' tokens of an image after unpadding, newlines not counted."""
    g = cfg.vision.image_size // cfg.vision.patch_size
    rows, cols = anyres.tile_grid(cfg, h, w)
    top, bottom, left, right = anyres.unpad(rows * g, cols * g, h, w)
    return (bottom - top) * (right - left)


def case(data, m, sizes):
    model, seed = m
    assume(model.cfg.feature_layers[-1] > 0)  # CLS attention needs a layer, not the embeddings
    skip = data.draw(hd_skips(model))
    if skip.summary:  # q2 pools tile tokens: an extreme aspect ratio can leave none
        assume(all(tile_tokens(model.cfg, h, w) > 0 for h, w in sizes))
    lengths = data.draw(st.lists(st.integers(0, 5), min_size=len(sizes), max_size=len(sizes)))
    return (model, skip, *next_inputs(model.cfg, seed, lengths, sizes))


@settings(max_examples=40)
@given(m=next_models(), sizes=image_sizes, data=st.data())
def test_hd_forward_equals_dense_oracle(m, sizes, data):
    model, skip, ids, mask, _, px, hw = case(data, m, sizes)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip, image_sizes=hw)
        got = model.logits(model.run(inp))
        want, kinds = dense.logits(model, ids, px, mask, skip, hw)
    for b, (w, k) in enumerate(zip(want, kinds)):
        valid = inp.attention_mask[b]
        assert inp.layout.kind[b][valid].tolist() == k
        assert_close(got[b][valid], w, 1e-12 * max([1.0] + w.abs().flatten().tolist()), f"row {b}")


@settings(max_examples=15)
@given(m=next_models(), sizes=image_sizes, data=st.data())
def test_hd_cached_greedy_equals_the_no_cache_oracle_with_eviction(m, sizes, data):
    model, skip, ids, mask, _, px, hw = case(data, m, sizes)
    got = generate(model, ids, px, mask, max_new_tokens=4, eos_ids=[], skip=skip,
                   image_sizes=hw).tokens
    with torch.no_grad():
        want = dense.naive_generate(model, ids, px, mask.bool(), 4, skip, hw)
    assert torch.equal(got, want)


@settings(max_examples=15)
@given(m=next_models(), size=st.tuples(st.integers(1, 60), st.integers(1, 60)),
       n=st.integers(1, 3), data=st.data())
def test_hd_keeping_every_token_is_the_plain_model_and_a_batch_equals_its_rows(m, size, n, data):
    model, seed = m
    ids, mask, _, px, hw = next_inputs(model.cfg, seed, [2] * n, [size] * n)
    N = hw.new_tensor(0) + int((ids[0] == model.cfg.image_token_id).sum())
    noop = SkipConfig(retained=int(N), skipped=0, summary=False)
    with torch.no_grad():
        plain = model(ids, px, mask, image_sizes=hw)
        assert torch.equal(plain, model(ids, px, mask, skip=noop, image_sizes=hw))
        skip = data.draw(hd_skips(model))
        assume(not skip.summary or tile_tokens(model.cfg, *size) > 0)
        batch = model(ids, px, mask, skip=skip, image_sizes=hw)
        for b in range(n):
            alone = model(ids[b:b + 1], px[b:b + 1], mask[b:b + 1], skip=skip,
                          image_sizes=hw[b:b + 1])
            assert_close(batch[b], alone[0], 1e-12, f"row {b}")


@settings(max_examples=20)
@given(m=next_models(dtype=torch.float32), sizes=image_sizes, data=st.data(),
       use_skip=st.booleans())
def test_hd_flops_equal_flop_counter(m, sizes, data, use_skip):
    """Vision side (every tile), prefill, decode steps and KV bytes, plain and HD."""
    model, skip, ids, mask, _, px, hw = case(data, m, sizes)
    skip = skip if use_skip else None
    texts = [int(r.sum()) - flops.image_counts(model.cfg, [s])[0][0] for r, s in zip(mask, sizes)]
    cfg, rows = model.cfg, [[s] for s in sizes]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as c:
            inp = model.prepare(ids, px, mask, skip=skip, image_sizes=hw)
        assert c.get_total_flops() == flops.vision(cfg, list(map(tuple, sizes)), skip)["total"]
        g = flops.geometry_of(inp, cfg)
        assert g == flops.geometry(cfg, texts, rows, skip)
        cache = KVCache(cfg.text.num_hidden_layers)
        with FlopCounterMode(display=False) as c:
            logits = prefill(model, inp, cache)
        assert c.get_total_flops() == flops.prefill(cfg, g)["total"]
        evict = skip is not None and skip.kv == "evict"
        if evict:
            cache.keep(~inp.layout.is_skipped)
        with FlopCounterMode(display=False) as c:
            decode_step(model, logits.argmax(-1), inp.pos.max(1).values + 1, cache)
        assert c.get_total_flops() == flops.decode_step(cfg, g, 0, evict)["total"]
        assert cache.nbytes() == flops.kv_bytes(cfg, g.batch, g.cache_slots(evict) + 1)


def test_the_paper_hd_geometry_beside_the_paper():
    """SV-LLaVA-HD on llava-v1.6-vicuna-7b-hf, 32 text tokens. At 5 x 576 image tokens (the
    thumbnail and 2 x 2 tiles of an image of the grid's shape, whose 48 tile rows each end in a
    newline: 576 + 48 x 49), 2,304 tile tokens merge to 576 (the newlines are dropped): 25.9%
    of the LM prefill FLOPs, where the paper prints 50%; with 2 tiles (336 x 672) 44.9%."""
    cfg = from_hf(REAL["llava-hf/llava-v1.6-vicuna-7b-hf"])
    assert flops.image_counts(cfg, [(672, 672)]) == [(576 + 48 * 49, 5, 48)]
    c = flops.compare(cfg, 32, [(672, 672)], "sv-llava-hd-576-576")
    assert c["tokens"] == dict(plain=32 + 2928, skip=32 + 576 + 1 + 576 + 1, skipped=576)
    assert abs(c["prefill"]["ratio"] - 0.259) < 0.001
    two = flops.compare(cfg, 32, [(336, 672)], "sv-llava-hd-576-576")["prefill"]["ratio"]
    assert abs(two - 0.449) < 0.001
