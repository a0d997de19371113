"""Skip-Vision's fast paths against the dense oracle in reference/dense.py (float64)."""
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_close, llava_inputs, randomize_
from reference import dense
from skipvision import Llava, LlavaConfig, TextConfig, VisionConfig
from skipvision.skip import SkipConfig, merge, skip_ffn, split_images, summary_pool


@st.composite
def models(draw, summary=None):
    heads = draw(st.integers(1, 3), label="heads")
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]), label="kv")
    patch, grid = draw(st.integers(2, 4)), draw(st.integers(2, 5), label="grid")
    v_layers = draw(st.integers(1, 3))
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=v_layers,
                            num_attention_heads=draw(st.sampled_from([1, 2])),
                            image_size=patch * grid, patch_size=patch),
        text=TextConfig(vocab_size=48, hidden_size=4 * heads, intermediate_size=20,
                        num_hidden_layers=draw(st.integers(1, 3), label="layers"),
                        num_attention_heads=heads, num_key_value_heads=kv,
                        rms_norm_eps=1e-5),
        image_token_id=47, vision_feature_layer=draw(st.integers(1, v_layers), label="layer"),
        vision_feature_select_strategy=draw(st.sampled_from(["default", "full"])),
        summary=draw(st.booleans()) if summary is None else summary)
    seed = draw(st.integers(0, 2**16), label="seed")
    return randomize_(Llava(cfg), seed).double().eval(), seed


@st.composite
def skips(draw, cfg, **fixed):
    n, layers = cfg.image_seq_length, cfg.text.num_hidden_layers
    summary = fixed.get("summary", draw(st.booleans(), label="summary"))
    lo = 1 if summary else 0
    n_r = draw(st.integers(lo, n - lo), label="retained")
    n_s = draw(st.integers(max(lo, int(n_r == 0)), n - n_r), label="skipped")  # >= 1 token kept
    which = draw(st.none() | st.lists(st.integers(0, layers - 1), min_size=1, unique=True))
    kw = dict(retained=n_r, skipped=n_s, summary=summary, layers=which,
              mask=draw(st.sampled_from(["causal", "consistent"])),
              kv=draw(st.sampled_from(["evict", "keep"])),
              merge_order=draw(st.sampled_from(["redundancy", "spatial"])))
    kw.update(fixed)
    return SkipConfig(**kw)


lengths = st.lists(st.integers(0, 5), min_size=1, max_size=3)


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
@given(m=models(), data=st.data(), n_img=st.integers(1, 3))
def test_selection_merge_and_summary_equal_oracle(m, data, n_img):
    model, seed = m
    skip = data.draw(skips(model.cfg))
    g = torch.Generator().manual_seed(seed)
    S = model.cfg.vision.image_size
    px = torch.randn(n_img, 3, S, S, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ret, mrg, keep, rest, _, _ = split_images(model, px, skip)
        feats, maps = dense.image_features(model, px)
    assert keep.tolist() == dense.select(maps, model.cfg, skip.retained)
    for i in range(n_img):
        want, dst = dense.merge(feats[i, rest[i]], skip.skipped, skip.merge_order)
        assert_close(mrg[i], want, 1e-12, f"merge image {i}")
        assert_close(ret[i], feats[i, keep[i]], 1e-12, "retained")
        if skip.summary:
            for x in (ret[i], mrg[i]):
                got = summary_pool(x[None], model.summary_scorer)[0]
                assert_close(got, dense.pool(x, model.summary_scorer), 1e-12, "summary")


@settings()
@given(seed=st.integers(0, 2**16), M=st.integers(1, 12), data=st.data())
def test_merge_properties(seed, M, data):
    """Every candidate lands in exactly one output; each output is the mean of its group."""
    n_out = data.draw(st.integers(1, M))
    x = torch.randn(2, M, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out, dst, slot = merge(x, n_out, data.draw(st.sampled_from(["redundancy", "spatial"])))
    assert sorted(slot[0].tolist()) == sorted(slot[0].tolist()) and slot.min() >= 0
    for i in range(2):
        for s in range(n_out):
            members = (slot[i] == s).nonzero().squeeze(1)
            assert int(dst[i, s]) in members.tolist()
            assert_close(out[i, s], x[i, members].mean(0), 1e-12, "group mean")


@settings()
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(1, 9), data=st.data())
def test_skip_ffn_equals_masked_oracle(seed, B, T, data):
    from skipvision.llama import MLP, RMSNorm
    cfg = TextConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2)
    g = torch.Generator().manual_seed(seed)
    mlp, norm = randomize_(MLP(cfg), seed).double(), randomize_(RMSNorm(8, 1e-5), seed).double()
    h = torch.randn(B, T, 8, generator=g, dtype=torch.float64)
    skipped = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T)))
    rows = (~skipped).nonzero().squeeze(1)
    want = h + torch.where(skipped.view(B, T, 1), 0.0, mlp(norm(h)))
    assert_close(skip_ffn(h, mlp, norm, rows), want, 1e-12, "skip_ffn")


@settings(max_examples=10)
@given(m=models(summary=True), data=st.data(), lens=lengths)
def test_gradients_equal_dense_oracle(m, data, lens):
    """Gradients reach every parameter through the skipped tokens' attention path and the
    summary scorer, and equal the dense oracle's."""
    model, seed = m
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
    n_skipped = int(inp.layout.skipped.sum())
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
