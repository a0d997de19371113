"""The training-free pruners (skipvision/pruning) against their slow oracles in
reference/pruning.py (float64), batches against their rows one by one, and the cache."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_close, llava_inputs, next_inputs, tiny
from reference import pruning as oracle
from skipvision.errors import ConfigError, InputError
from skipvision.generate import generate
from skipvision.kv_cache import KVCache
from skipvision.pruning import IN_LM, METHODS, Prune, inlm, select
from skipvision import anyres
from strategies import image_sizes, lengths, models, next_models


@st.composite
def prunes(draw, cfg, methods=METHODS):
    """A Prune that fits `cfg` (in-LM methods need a second decoder layer)."""
    L, n = cfg.text.num_hidden_layers, cfg.image_seq_length
    usable = [m for m in methods if m not in IN_LM or L >= 2]
    method = draw(st.sampled_from(usable), label="method")
    budget = draw(st.integers(1, n), label="budget")
    return Prune(method, budget, seed=draw(st.integers(0, 3)),
                 layer=draw(st.integers(1, max(1, L - 1))),
                 contextual=draw(st.none() | st.integers(0, budget)),
                 pivots=draw(st.none() | st.integers(1, budget)))


@settings()
@given(m=models(), data=st.data(), lens=lengths, n_img=st.integers(1, 2))
def test_prefill_equals_the_oracle(m, data, lens, n_img):
    model, seed = m
    p = data.draw(prunes(model.cfg))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens, n_img)
    with torch.no_grad():
        got = model.logits(model.run(model.prepare(ids, px, mask, skip=p))[:, -1])
        want = oracle.logits(model, ids, px, mask, p)
    for b, w in enumerate(want):
        assert_close(got[b], w, 1e-10, f"{p} row {b}")


@settings()
@given(m=models(), data=st.data(), lens=lengths, n_img=st.integers(1, 2))
def test_cached_generation_equals_the_oracle_and_a_batch_its_rows(m, data, lens, n_img):
    """Greedy tokens with the KV cache (two groups of slots for in-LM pruners) equal the
    no-cache oracle, and each batch row generated alone."""
    model, seed = m
    p = data.draw(prunes(model.cfg))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens, n_img)
    out = generate(model, ids, px, mask, max_new_tokens=3, eos_ids=(), skip=p)
    with torch.no_grad():
        want = oracle.naive_generate(model, ids, px, mask, 3, p)
    assert torch.equal(out.tokens, want), p
    start = 0
    for b in range(ids.shape[0]):
        rows = slice(start, start + n_img)
        one = generate(model, ids[b:b + 1], px[rows], mask[b:b + 1], max_new_tokens=3,
                       eos_ids=(), skip=p)
        assert torch.equal(one.tokens[0], out.tokens[b]), (p, b)
        start += n_img


@settings()
@given(m=models(), data=st.data(), lens=lengths)
def test_keeping_every_token_is_the_plain_model(m, data, lens):
    model, seed = m
    n, L = model.cfg.image_seq_length, model.cfg.text.num_hidden_layers
    usable = [k for k in ("random", "divprune", "fastv", "dart") if k not in IN_LM or L >= 2]
    p = Prune(data.draw(st.sampled_from(usable)), n, layer=1)
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens)
    with torch.no_grad():
        plain = model.logits(model.run(model.prepare(ids, px, mask))[:, -1])
        pruned = model.logits(model.run(model.prepare(ids, px, mask, skip=p))[:, -1])
    assert_close(pruned, plain, 1e-12, p.method)


@settings()
@given(n=st.integers(1, 30), c=st.integers(1, 6), seed=st.integers(0, 2**16), data=st.data())
def test_selections_equal_their_oracles(n, c, seed, data):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    attn = torch.rand(n, generator=g, dtype=torch.float64)
    budget = data.draw(st.integers(1, n))
    ctx = data.draw(st.integers(0, budget))
    p = Prune("visionzip", budget, contextual=ctx, seed=data.draw(st.integers(0, 9)))
    assert select.divprune(p, x, attn)[0].tolist() == oracle.divprune_keep(x, budget)
    assert select.random(p, x, attn)[0].tolist() == oracle.random_keep(x, p)
    keep, made = select.visionzip(p, x, attn)
    want_keep, want_made = oracle.visionzip_tokens(x, attn, budget, ctx)
    assert keep.tolist() == want_keep and len(keep) + len(made) == budget
    for a, b in zip(made, want_made, strict=True):
        assert_close(a, b, 1e-12, "contextual token")


def test_divprune_is_max_min_diverse_on_clusters():
    """Three tight clusters: a budget of 3 takes one token of each; random would often not."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, dtype=torch.float64) * 10
    x = torch.cat([centres[i] + 0.01 * torch.randn(5, 3, generator=g, dtype=torch.float64)
                   for i in range(3)])
    keep = select.divprune(Prune("divprune", 3), x, None)[0]
    assert sorted((keep // 5).tolist()) == [0, 1, 2]


class Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.seen.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_in_lm_pruners_form_no_attention_map(method, monkeypatch):
    """What a pruner computes inside the LLM has no (T, T) map: FastV scores one query row."""
    model = tiny(layers=3, image_size=12)
    cfg = model.cfg
    ids, mask, _, px = llava_inputs(cfg, 0, [5, 2])
    T = ids.shape[1]
    calls = []
    original = inlm.InLM.__call__

    def spy(self, lm, i, x, pos, horizon):
        with Shapes() as s:
            out = original(self, lm, i, x, pos, horizon)
        calls.append(s.seen)
        return out
    monkeypatch.setattr(inlm.InLM, "__call__", spy)
    with torch.no_grad():
        model.run(model.prepare(ids, px, mask, skip=Prune(method, 4, layer=2)))
    shapes = [s for c in calls for s in c]
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[-1] >= T and s[-2] >= T]


def test_in_lm_pruners_leave_the_later_layers_fewer_slots():
    model = tiny(layers=3, image_size=12)
    cfg = model.cfg
    ids, mask, _, px = llava_inputs(cfg, 0, [5, 2])
    cache = KVCache(3)
    with torch.no_grad():
        model.run(model.prepare(ids, px, mask, skip=Prune("fastv", 4, layer=2)), cache)
    n_img, T = cfg.image_seq_length, ids.shape[1]
    assert [k.shape[2] for k in cache.k] == [T, T, T - (n_img - 4)]
    assert sorted(cache.slots) == [0, 2]
    with pytest.raises(ValueError, match="one group"):
        cache.keep(torch.ones(2, T, dtype=torch.bool))


@pytest.mark.parametrize("kw, message", [
    (dict(method="fastvv", budget=4), "Prune.method"),
    (dict(method="random", budget=0), "Prune.budget"),
    (dict(method="random", budget=2.0), "Prune.budget"),
    (dict(method="fastv", budget=4, layer=0), "Prune.layer"),
    (dict(method="visionzip", budget=4, contextual=5), "contextual 5 exceeds"),
    (dict(method="dart", budget=4, pivots=5), "pivots 5 exceeds"),
    (dict(method="random", budget=4, seed=-1), "Prune.seed")])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        Prune(**kw)


def test_a_budget_or_layer_the_model_cannot_take_is_refused():
    model = tiny(layers=2, image_size=4)
    cfg = model.cfg
    ids, mask, _, px = llava_inputs(cfg, 0, [3])
    with pytest.raises(ConfigError, match="budget 5 exceeds the 4 tokens"):
        model.prepare(ids, px, mask, skip=Prune("random", 5))
    with pytest.raises(ConfigError, match="layer 2: the decoder has 2"):
        model.prepare(ids, px, mask, skip=Prune("fastv", 2, layer=2))
    with pytest.raises(InputError, match="position_ids"):
        model.prepare(ids, px, mask, mask.cumsum(1) - 1, skip=Prune("random", 2))


@settings()
@given(m=next_models(), data=st.data(), sizes=image_sizes)
def test_llava_next_prefill_and_generation_equal_the_oracle(m, data, sizes):
    """Per image its own budget, over the base tile, the tiles and the row-end newlines."""
    model, seed = m
    n = min(anyres.image_tokens(model.cfg, h, w) for h, w in sizes)
    p = data.draw(prunes(model.cfg), label="prune")
    p = Prune(p.method, min(p.budget, n), layer=p.layer)
    lens = data.draw(st.lists(st.integers(0, 4), min_size=len(sizes), max_size=len(sizes)))
    ids, mask, _, px, hw = next_inputs(model.cfg, seed, lens, sizes)
    with torch.no_grad():
        got = model.logits(model.run(model.prepare(ids, px, mask, skip=p, image_sizes=hw))[:, -1])
        want = oracle.logits(model, ids, px, mask, p, hw)
        for b, w in enumerate(want):
            assert_close(got[b], w, 1e-10, f"{p} row {b}")
        out = generate(model, ids, px, mask, max_new_tokens=2, eos_ids=(), skip=p, image_sizes=hw)
        assert torch.equal(out.tokens, oracle.naive_generate(model, ids, px, mask, 2, p, hw))
