"""Cached generation against the no-cache oracle; batches against single rows; sampling."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import assert_close, llava_inputs
from reference import dense
from skipvision import KVCache, generate, sample
from skipvision.generate import decode_step, prefill
from strategies import lengths, models, skips


@settings()
@given(m=models(), data=st.data(), lens=lengths, use_skip=st.booleans())
def test_cached_greedy_equals_naive_oracle(m, data, lens, use_skip):
    model, seed = m
    skip = data.draw(skips(model.cfg)) if use_skip else None
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens)
    got = generate(model, ids, px, mask, max_new_tokens=6, eos_ids=[], skip=skip).tokens
    want = dense.naive_generate(model, ids, px, mask, 6, skip)
    assert torch.equal(got, want), f"\n{got}\n{want}"


@settings()
@given(m=models(), data=st.data(), lens=st.lists(st.integers(0, 6), min_size=2, max_size=3),
       use_skip=st.booleans())
def test_batch_equals_rows_alone(m, data, lens, use_skip):
    model, seed = m
    skip = data.draw(skips(model.cfg)) if use_skip else None
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens)
    with torch.no_grad():
        batch = model.prepare(ids, px, mask, skip=skip)
        batch_logits = model.logits(model.run(batch))
    batch_tokens = generate(model, ids, px, mask, max_new_tokens=5, eos_ids=[], skip=skip).tokens
    for b, L in enumerate(lens):
        row_ids, row_mask = ids[b:b + 1, -mask[b].sum():], mask[b:b + 1, -mask[b].sum():]
        with torch.no_grad():
            alone = model.prepare(row_ids, px[b:b + 1], row_mask, skip=skip)
            alone_logits = model.logits(model.run(alone))
        valid = batch.attention_mask[b]
        assert_close(batch_logits[b][valid], alone_logits[0], 1e-12, f"row {b} prefill logits")
        alone_tokens = generate(model, row_ids, px[b:b + 1], row_mask, max_new_tokens=5, eos_ids=[],
                                skip=skip).tokens
        assert torch.equal(batch_tokens[b], alone_tokens[0])


@settings()
@given(m=models(), data=st.data(), lens=lengths)
def test_eviction_equals_full_cache_with_skipped_keys_hidden(m, data, lens):
    """Skip-KV: the evicted cache gives the logits of the full cache + a mask."""
    model, seed = m
    skip = data.draw(skips(model.cfg, kv="evict"))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
        evicted, masked = KVCache(model.cfg.text.num_hidden_layers), None
        first = prefill(model, inp, evicted)
        masked = KVCache(model.cfg.text.num_hidden_layers)
        assert torch.equal(prefill(model, inp, masked), first)
        evicted.keep(~inp.layout.is_skipped)
        last = inp.pos.max(1).values
        masked.slots[0] = masked.pos, torch.where(inp.layout.is_skipped, last[:, None],
                                                  masked.horizon)
        pos = last + 1
        for _ in range(4):
            tok = torch.randint(0, model.cfg.text.vocab_size - 1, (ids.shape[0],), generator=g)
            a, b = decode_step(model, tok, pos, evicted), decode_step(model, tok, pos, masked)
            assert_close(a, b, 1e-12, "decode logits")
            pos = pos + 1


@settings()
@given(m=models(), data=st.data(), lens=lengths)
def test_consistent_mask_makes_eviction_lossless(m, data, lens):
    model, seed = m
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens)
    skip = data.draw(skips(model.cfg, mask="consistent", kv="evict"))
    keep = skip.__class__(**{**skip.__dict__, "kv": "keep"})
    a = generate(model, ids, px, mask, max_new_tokens=5, eos_ids=[], skip=skip)
    b = generate(model, ids, px, mask, max_new_tokens=5, eos_ids=[], skip=keep)
    assert torch.equal(a.tokens, b.tokens)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        caches = [KVCache(model.cfg.text.num_hidden_layers) for _ in range(2)]
        inp = model.prepare(ids, px, mask, skip=skip)
        prefill(model, inp, caches[0]), prefill(model, inp, caches[1])
        caches[0].keep(~inp.layout.is_skipped)
        pos = inp.pos.max(1).values + 1
        for _ in range(4):
            tok = torch.randint(0, model.cfg.text.vocab_size - 1, (ids.shape[0],), generator=g)
            la, lb = (decode_step(model, tok, pos, c) for c in caches)
            # equal up to summation order: SDPA reduces over S and S - N_s keys respectively
            assert_close(la, lb, 1e-12, "consistent: evict vs keep")
            pos = pos + 1


@settings()
@given(m=models(), data=st.data(), n=st.integers(1, 3), lens=st.integers(0, 5))
def test_cache_shrinks_by_the_skipped_share(m, data, n, lens):
    """Equal-length rows: every layer keeps exactly n - N_s * images of its n slots."""
    model, seed = m
    skip = data.draw(skips(model.cfg, kv="evict"))
    ids, mask, _, px = llava_inputs(model.cfg, seed, [lens] * n, images=1)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
        cache = KVCache(model.cfg.text.num_hidden_layers)
        prefill(model, inp, cache)
        before = [(k.numel() * k.element_size(), k.shape[2]) for k in cache.k]
        cache.keep(~inp.layout.is_skipped)
    S = inp.embeds.shape[1]
    for (nbytes, slots), k, v in zip(before, cache.k, cache.v):
        assert slots == S and k.shape[2] == S - skip.skipped
        assert k.numel() * k.element_size() * S == nbytes * (S - skip.skipped)
        assert v.shape == k.shape


def test_sampling_is_reproducible_and_respects_top_k_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g, dtype=torch.float64)
    draw = lambda seed, **kw: sample(logits, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(1, temperature=0.8, top_p=0.9), draw(1, temperature=0.8, top_p=0.9))
    assert torch.equal(sample(logits), logits.argmax(-1))
    top3 = logits.topk(3, -1).indices
    for s in range(30):
        t = draw(s, temperature=1.5, top_k=3)
        assert (top3 == t[:, None]).any(-1).all()
    probs = logits.softmax(-1)
    for s in range(30):
        t = draw(s, temperature=1.0, top_p=0.5)
        for b in range(4):  # allowed: the smallest prefix of the sorted tokens holding >= 0.5 mass
            p, order = probs[b].sort(descending=True)
            n_keep = int((p.cumsum(0) < 0.5).sum()) + 1
            assert int(t[b]) in order[:n_keep].tolist()


def test_generation_stops_at_eos_and_pads_with_it():
    from skipvision import Llava, LlavaConfig, TextConfig, VisionConfig
    from helpers import randomize_
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=4, patch_size=2),
                      text=TextConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=2),
                      image_token_id=15)
    model = randomize_(Llava(cfg), 3).double()
    ids, mask, _, px = llava_inputs(cfg, 3, [2, 4])
    free = generate(model, ids, px, mask, max_new_tokens=8, eos_ids=[])
    eos = int(free.tokens[0, 2])
    out = generate(model, ids, px, mask, max_new_tokens=8, eos_ids=[eos])
    for b in range(2):
        row = free.tokens[b].tolist()
        n = row.index(eos) + 1 if eos in row else 8
        assert out.lengths[b] == n and out.tokens[b, :n].tolist() == row[:n]
        assert (out.tokens[b, n:] == eos).all()
    with pytest.raises(ValueError, match="temperature"):
        sample(free.tokens.double(), temperature=-1.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1),
                                       (torch.float16, 2e-2)])
def test_low_precision_runs_and_stays_near_float64(dtype, tol):
    from skipvision import Llava, LlavaConfig, TextConfig, VisionConfig
    from skipvision.skip import SkipConfig
    from helpers import randomize_
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=12, patch_size=3),
                      text=TextConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2), image_token_id=39, summary_scorer=True)
    ref = randomize_(Llava(cfg), 5).double().eval()
    low = randomize_(Llava(cfg), 5).to(dtype).eval()
    ids, mask, _, px = llava_inputs(cfg, 5, [3, 6])
    for skip in (None, SkipConfig(retained=6, skipped=5)):
        with torch.no_grad():
            want = ref(ids, px, mask, skip=skip)
            got = low(ids, px.to(dtype), mask, skip=skip)
        assert got.dtype == dtype and torch.isfinite(got).all()
        a, b = ref.prepare(ids, px, mask, skip=skip), low.prepare(ids, px.to(dtype), mask, skip=skip)
        if skip is not None and not all(map(torch.equal, a.layout.dest, b.layout.dest)):
            continue  # rounding changed a discrete choice (selection or merge): not comparable
        valid = a.attention_mask
        err = (got.double() - want)[valid].abs().max() / want[valid].abs().max()
        assert err < tol, f"{dtype} relative error {err:.2e}"
        out = generate(low, ids, px.to(dtype), mask, max_new_tokens=3, eos_ids=[], skip=skip)
        assert out.tokens.shape == (2, 3)
