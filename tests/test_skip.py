"""Skip-Vision's fast paths against the dense oracle in reference/dense.py (float64)."""
import torch
from hypothesis import assume, given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_close, llava_inputs, randomize_
from reference import dense
from skipvision import SkipConfig, TextConfig
from skipvision.vlm import ImageTokens
from skipvision.skip import (PAD, RETAINED, SKIPPED, TEXT, by_cls_attention, complement,
                             merge, summary_pool)
from strategies import lengths, models, skips


@settings()
@given(m=models(), data=st.data(), lens=lengths, n_img=st.integers(0, 2))
def test_noop_config_is_the_plain_model_bit_for_bit(m, data, lens, n_img):
    model, seed = m
    n = model.cfg.image_seq_length
    noop = SkipConfig(retained=n, skipped=0, summary=False,
                      merge_order=data.draw(st.sampled_from(["redundancy", "spatial"])))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens, n_img)
    px = px if n_img else None
    with torch.no_grad():
        plain, skipped = model(ids, px, mask), model(ids, px, mask, skip=noop)
    v = mask.bool()
    assert torch.equal(plain[v], skipped[v])


@settings()
@given(m=models(), data=st.data(), lens=lengths, n_img=st.integers(1, 2))
def test_forward_equals_dense_oracle(m, data, lens, n_img):
    """Selection, merge, summary pooling, layout, mask and Skip-FFN together, row by row."""
    model, seed = m
    skip = data.draw(skips(model.cfg))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens, n_img)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
        got = model.logits(model.run(inp))
        want, kinds = dense.logits(model, ids, px, mask, skip)
    for b, (w, k) in enumerate(zip(want, kinds)):
        valid = inp.attention_mask[b]
        assert inp.layout.kind[b][valid].tolist() == k
        scale = max([1.0] + w.abs().flatten().tolist())
        assert_close(got[b][valid], w, 1e-12 * scale, f"row {b}")


@settings()
@given(m=models(), data=st.data(), lens=lengths, n_img=st.integers(0, 2))
def test_layout_says_where_every_token_came_from_and_went(m, data, lens, n_img):
    """Text and retained tokens copy the plain row `index` names; each image token's `dest`
    holds itself (retained) or the mean of the tokens that share its dest (merged)."""
    model, seed = m
    skip = data.draw(skips(model.cfg))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens, n_img)
    with torch.no_grad():
        plain, inp = model.prepare(ids, px, mask), model.prepare(ids, px, mask, skip=skip)
    lay, flat = inp.layout, plain.embeds.flatten(0, 1)
    copied = lay.index >= 0
    assert torch.equal(inp.embeds[copied], flat[lay.index[copied]])
    assert set(lay.kind[copied].tolist()) <= {TEXT, RETAINED}
    n_text = int(mask.sum()) - n_img * len(lens) * model.cfg.image_seq_length
    assert int((lay.kind == TEXT).sum()) == n_text
    assert bool((lay.kind[~inp.attention_mask] == PAD).all())
    feats = model.image_features(px)[0] if n_img else None  # per image (N, C)
    for i in range(n_img * len(lens)):
        b = int((lay.image == i).any(1).nonzero())
        dest = lay.dest[i]
        assert len(set(dest.tolist()) - {-1}) == skip.retained + skip.skipped
        assert ((dest == -1).sum() > 0) == (skip.skipped == 0 and skip.retained < dest.numel())
        for d in set(dest.tolist()) - {-1}:
            group = (dest == d).nonzero().squeeze(1)
            assert int(lay.kind[b, d]) == (RETAINED if len(group) == 1 and int(
                lay.index[b, d]) >= 0 else SKIPPED)
            assert_close(inp.embeds[b, d], feats[i][group].mean(0), 1e-12, f"image {i} col {d}")


@settings()
@given(m=models(), data=st.data(), n_img=st.integers(1, 3))
def test_selection_merge_and_summary_equal_oracle(m, data, n_img):
    model, seed = m
    skip = data.draw(skips(model.cfg))
    g = torch.Generator().manual_seed(seed)
    S = model.cfg.vision.image_size
    px = torch.randn(n_img, 3, S, S, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got_feats, cls, _ = model.image_features(px, cls_attention=True)
        got_feats, cls = torch.stack(got_feats), torch.stack(cls)  # (I, N, C), (I, N)
        keep = by_cls_attention(ImageTokens(torch.zeros(n_img), [], list(cls)),
                                list(range(n_img)), skip.retained)
        rest = complement(keep, cls.shape[1])
        take = lambda idx: got_feats.gather(1, idx[..., None].expand(-1, -1, got_feats.shape[-1]))
        mrg, _, _ = merge(take(rest), skip.skipped, skip.merge_order)
        feats, maps = dense.image_features(model, px)
    assert keep.tolist() == dense.select(maps, model.cfg, skip.retained)
    assert_close(got_feats, feats, 1e-12, "image features")
    for i in range(n_img):
        assert sorted(keep[i].tolist() + rest[i].tolist()) == list(range(cls.shape[1]))
        want, dst = dense.merge(feats[i, rest[i]], skip.skipped, skip.merge_order)
        assert_close(mrg[i], want, 1e-12, f"merge image {i}")
        if skip.summary:
            for x in (take(keep)[i], mrg[i]):
                got = summary_pool(x[None], model.summary_scorer)[0]
                assert_close(got, dense.pool(x, model.summary_scorer), 1e-12, "summary")


@settings()
@given(seed=st.integers(0, 2**16), M=st.integers(1, 12), data=st.data())
def test_merge_properties(seed, M, data):
    """Every candidate lands in exactly one output; each output is the mean of its group."""
    n_out = data.draw(st.integers(1, M))
    x = torch.randn(2, M, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out, dst, slot = merge(x, n_out, data.draw(st.sampled_from(["redundancy", "spatial"])))
    assert out.shape == (2, n_out, 5) and dst.shape == (2, n_out) and slot.shape == (2, M)
    assert slot.min() >= 0 and slot.max() < n_out  # every candidate joins exactly one output
    for i in range(2):
        assert len(set(dst[i].tolist())) == n_out  # distinct destinations ...
        assert slot[i, dst[i]].tolist() == list(range(n_out))  # ... each in its own output
        for s in range(n_out):
            members = (slot[i] == s).nonzero().squeeze(1)
            assert_close(out[i, s], x[i, members].mean(0), 1e-12, "group mean")


@settings()
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(1, 9), data=st.data())
def test_skip_ffn_rows_equal_masked_oracle(seed, B, T, data):
    """A decoder layer given `ffn_rows` (gather/scatter) equals the full layer with the FFN
    output zeroed on the other rows, forward and backward."""
    from skipvision.llama import DecoderLayer, rope_cos_sin
    cfg = TextConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2,
                     num_key_value_heads=1)
    layer = randomize_(DecoderLayer(cfg), seed).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), cfg, x.dtype)
    skipped = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T)))
    got = layer(x, cos, sin, None, ffn_rows=(~skipped).nonzero().squeeze(1))
    h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, None)
    ffn = layer.mlp(layer.post_attention_layernorm(h))
    want = h + torch.where(skipped.view(B, T, 1), 0.0, ffn)
    assert_close(got, want, 1e-12, "Skip-FFN forward")
    w = torch.randn(B, T, 8, generator=g, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_want,) = torch.autograd.grad((want * w).sum(), x)
    assert_close(g_got, g_want, 1e-12, "Skip-FFN backward")


@settings(max_examples=10)
@given(m=models(summary_scorer=True), data=st.data(), lens=lengths)
def test_gradients_equal_dense_oracle(m, data, lens):
    """Gradients reach every parameter through the skipped tokens' attention path and the
    summary scorer, and equal the dense oracle's."""
    model, seed = m
    assume(model.cfg.image_seq_length >= 2)  # summary tokens need a retained and a skipped one
    skip = data.draw(skips(model.cfg, summary=True))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens)
    g = torch.Generator().manual_seed(seed)
    model.train()
    logits = model(ids, px, mask, skip=skip)
    w = torch.randn(logits.shape, generator=g, dtype=torch.float64)
    valid = model.prepare(ids, px, mask, skip=skip).attention_mask
    (logits[valid] * w[valid]).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want_logits, _ = dense.logits(model, ids, px, mask, skip)
    sum((l * w[b][valid[b]]).sum() for b, l in enumerate(want_logits)).backward()
    for n, p in model.named_parameters():
        want = torch.zeros_like(p) if p.grad is None else p.grad  # unused by the oracle
        assert_close(got.get(n, torch.zeros_like(p)), want, 1e-10 * max(1, want.abs().max()), n)
    if max(skip.retained, skip.skipped) > 1:  # a softmax over one token has no gradient
        assert got["summary_scorer.score.weight"].abs().sum() > 0
    assert got["multi_modal_projector.linear_1.weight"].abs().sum() > 0


@settings(max_examples=10)
@given(m=models(), data=st.data(), lens=lengths)
def test_training_step_skips_ffn_flops_forward_and_backward(m, data, lens):
    """A Skip-FFN training step saves exactly 3 x (forward FFN FLOPs) on the skipped rows."""
    model, seed = m
    skip = data.draw(skips(model.cfg))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens)
    inp = model.prepare(ids, px, mask, skip=skip)
    n_skipped = int(inp.layout.is_skipped.sum())
    C, Fd = model.cfg.text.hidden_size, model.cfg.text.intermediate_size
    n_layers = len(skip.ffn_layers(model.cfg.text.num_hidden_layers))

    def step_flops(rows):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        with FlopCounterMode(display=False) as fc:
            hidden = model.language_model.model(inp.embeds.detach(), inp.pos, inp.horizon,
                                                ffn_rows=rows)
            model.logits(hidden)[inp.attention_mask].logsumexp(-1).mean().backward()
        opt.step()
        return fc.get_total_flops()

    saved = step_flops(None) - step_flops(inp.ffn_rows)
    ffn_forward = 2 * 3 * C * Fd  # gate, up, down projections per row
    assert saved == 3 * ffn_forward * n_skipped * n_layers  # forward + 2x in backward
