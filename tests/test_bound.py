"""Property tests of the Skip-FFN / Skip-KV error bound (proofs/error_bound.md).

Hypothesis draws the structure (depth, width, heads and KV heads, tokens, padding, which rows
skip the FFN in which layers, which keys are evicted, weight scales including large and nearly
singular matrices, RMSNorm gains and eps); a seed draws the numbers. Everything is float64, so
the measured error is the method's error and a bound must hold up to rounding (RTOL).
Each lemma is checked on its own, then the theorems end to end and one step at a time;
`target(measured / bound)` steers the search toward tight cases. For every lemma a weakened
bound (a constant halved, a term dropped) must be violated on an example Hypothesis finds, so
these checks can fail. The session prints median and worst measured/bound ratios.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from unittest import mock

import pytest
import torch
from hypothesis import Phase, example, find, given, settings, target
from hypothesis import strategies as st

from skipvision import bound
from skipvision import bound_lemmas as lem
from skipvision.config import RopeConfig, TextConfig
from skipvision.kv_cache import FOREVER, NEVER
from skipvision.llama import LlamaForCausalLM, attention_mask, rope_cos_sin

# Float64 rounding: a bound holds if measured <= bound (1 + RTOL) + ATOL (|a| + |b|), where a
# and b are the two computed values whose difference is measured (unit roundoff 1.1e-16).
RTOL, ATOL = 1e-9, 1e-12
RATIOS: dict[str, list[float]] = defaultdict(list)  # property -> measured/bound per case
DRAWN: dict[str, int] = defaultdict(int)  # property -> cases drawn (some have zero error)
FOUND: dict[str, float] = {}  # weakened bound -> measured/weakened on the violating example
FIND = settings(max_examples=3000, derandomize=True, database=None,
                phases=(Phase.generate, Phase.target), deadline=None)
f64 = dict(dtype=torch.float64)


# ---------------------------------------------------------------- strategies and builders
@st.composite
def text_configs(draw, max_layers=3, acts=("silu",)):
    heads = draw(st.integers(1, 4), label="heads")
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]), label="kv")
    bias = draw(st.booleans(), label="bias")
    return TextConfig(
        vocab_size=draw(st.integers(2, 40), label="vocab"),
        hidden_size=draw(st.integers(1, 24), label="width"),
        intermediate_size=draw(st.integers(1, 32), label="ffn"),
        num_hidden_layers=draw(st.integers(1, max_layers), label="layers"),
        num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=draw(st.sampled_from([2, 4, 8]), label="head_dim"),
        hidden_act=draw(st.sampled_from(acts), label="act"),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.1, 1.0]), label="eps"),
        rope=RopeConfig(theta=draw(st.sampled_from([10.0, 1e4, 1e5]), label="theta")),
        tie_word_embeddings=draw(st.booleans(), label="tied"),
        attention_bias=bias, mlp_bias=bias, max_position_embeddings=64)


weight_specs = st.fixed_dictionaries(dict(
    scale=st.sampled_from([0.1, 1.0, 3.0, 30.0]),  # matrices ~ scale N(0, 1/fan_in)
    singular=st.booleans(),  # singular values spread over 1 .. 1e-8
    gain=st.sampled_from([0.01, 1.0, 10.0]), spread=st.sampled_from([0.0, 0.2, 2.0])))


def randomize(model, w, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g, **f64)
            if name.endswith("norm.weight"):
                p.copy_(w["gain"] * (1 + w["spread"] * r))
            elif "embed" in name or p.dim() == 1:
                p.copy_(0.5 * r)
            else:
                W = w["scale"] * r / math.sqrt(p.shape[1])
                if w["singular"]:
                    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                    S = S[0] * torch.logspace(0, -8, len(S), **f64)
                    W = U @ torch.diag(S) @ Vh
                p.copy_(W)
    return model


def vectors(g, shape, scale):
    return torch.randn(shape, generator=g, **f64) * scale


def perturb(g, x, rel, absolute):
    """x + per-row perturbations of size rel * ||x_row|| + absolute, random directions."""
    d = torch.randn(x.shape, generator=g, **f64)
    d = d / d.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    size = rel * x.norm(dim=-1, keepdim=True) + absolute
    keep = torch.rand(x.shape[:-1] + (1,), generator=g) < 0.3  # some rows unperturbed
    return x + torch.where(keep, 0, size * d)


scales = st.sampled_from([0.0, 1e-4, 1e-2, 1.0, 30.0])
rels = st.sampled_from([0.0, 1e-6, 1e-2, 0.3, 1.0, 3.0])


def record(name, measured, bound_, size=0.0):
    """Assert measured <= bound per element (size: |a| + |b|), record and target the worst
    measured/bound ratio."""
    m, b = torch.as_tensor(measured, **f64), torch.as_tensor(bound_, **f64)
    noise = ATOL * torch.as_tensor(size, **f64)
    bad = m > b * (1 + RTOL) + noise
    assert not bool(bad.any()), f"{name}: measured {m[bad].tolist()} > bound {b[bad].tolist()}"
    r = ratio(m, b, noise)
    DRAWN[name] += 1
    if r is not None:  # cases with no error above rounding say nothing about tightness
        RATIOS[name].append(r)
    target(r or 0.0, label=name)


def ratio(m, b, noise=0.0):
    """Worst measured / bound over the elements whose error is above rounding noise (None if
    there is none)."""
    m, b = torch.as_tensor(m, **f64), torch.as_tensor(b, **f64).expand_as(torch.as_tensor(m))
    above = m > noise
    return (m[above] / b[above]).max().item() if bool(above.any()) else None


def violated(name, measured, bound_, size=0.0):
    """True if a (weakened) bound fails beyond rounding; targets the ratio meanwhile."""
    m, b = torch.as_tensor(measured, **f64), torch.as_tensor(bound_, **f64)
    noise = 1e3 * ATOL * torch.as_tensor(size, **f64)
    r = ratio(m, b, noise) or 0.0
    target(min(r, 1e6), label=name)
    if r > 1.01:  # clearly, not by rounding
        FOUND[name] = max(FOUND.get(name, 0.0), r)
        return True
    return False


def gainless(x, eps):
    """n(x): RMSNorm without its gain."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---------------------------------------------------------------- Lemma 1: RMSNorm
lemma1_cases = st.fixed_dictionaries(dict(
    C=st.integers(1, 32), eps=st.sampled_from([1e-6, 1e-5, 1e-2, 1.0]), scale=scales,
    rel=rels, absolute=st.sampled_from([0.0, 1e-5, 0.1, 3.0]),
    gain=st.sampled_from([0.01, 1.0, 10.0]), spread=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16)))


def lemma1(c, weaken=None):
    g = torch.Generator().manual_seed(c["seed"])
    x = vectors(g, (4, c["C"]), c["scale"])
    y = perturb(g, x, c["rel"], c["absolute"])
    gain = c["gain"] * (1 + c["spread"] * torch.randn(c["C"], generator=g, **f64))
    norm = lambda t: gain * gainless(t, c["eps"])  # noqa: E731  the model's RMSNorm formula
    measured, size = (norm(x) - norm(y)).norm(dim=-1), norm(x).norm(dim=-1) + norm(y).norm(dim=-1)
    delta, xn = (x - y).norm(dim=-1), x.norm(dim=-1)
    if weaken == "no ball":  # Lipschitz constant at x only, not on the ball around it
        b = delta * math.sqrt(c["C"]) / (xn**2 + c["C"] * c["eps"]).sqrt()
    else:
        b = lem.rmsnorm_perturbation(xn, delta, c["eps"], c["C"])
    b = gain.abs().max() * b
    return measured, b / 2 if weaken == "halved" else b, size


@settings(max_examples=200)
@given(c=lemma1_cases)
@pytest.mark.bound
def test_lemma1_rmsnorm(c):
    record("Lemma 1 (RMSNorm)", *lemma1(c))


@pytest.mark.bound
@pytest.mark.parametrize("weaken", ["halved", "no ball"])
def test_lemma1_weakened_is_violated(weaken):
    find(lemma1_cases, lambda c: violated(f"Lemma 1 {weaken}", *lemma1(c, weaken)), settings=FIND)


def test_rmsnorm_matches_model():
    """The formula the lemmas use is the model's RMSNorm (float64)."""
    from skipvision.llama import RMSNorm
    norm = RMSNorm(5, 1e-3).double()
    x = torch.randn(3, 5, **f64)
    assert torch.allclose(norm(x), gainless(x, 1e-3), rtol=1e-14, atol=0)


# ---------------------------------------------------------------- Lemma 2: FFN sub-block
ALL_ACTS = ("silu", "silu", "quick_gelu", "relu", "gelu", "gelu_pytorch_tanh")
ffn_cases = st.fixed_dictionaries(dict(
    cfg=text_configs(max_layers=1, acts=ALL_ACTS), w=weight_specs, T=st.integers(1, 4),
    scale=scales, rel=rels, absolute=st.sampled_from([0.0, 1e-5, 0.1, 3.0]),
    seed=st.integers(0, 2**16)))


def lemma2(c, weaken=None):
    from skipvision.llama import DecoderLayer
    cfg = c["cfg"]
    layer = randomize(DecoderLayer(cfg).double(), c["w"], c["seed"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    h = vectors(g, (1, c["T"], cfg.hidden_size), c["scale"])
    h2 = perturb(g, h, c["rel"], c["absolute"])
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    a, a2 = mlp(norm(h)), mlp(norm(h2))
    measured, size = (a2 - a).norm(dim=-1), a.norm(dim=-1) + a2.norm(dim=-1)
    nu = (gainless(h2, cfg.rms_norm_eps) - gainless(h, cfg.rms_norm_eps)).norm(dim=-1)
    w, (_, s) = lem.weight_norms(layer, cfg), bound.ffn_stats(norm, mlp, h)
    if weaken == "first order only":
        t = lem.ffn_terms(nu, w, s)
        return measured, w.down * (t["gate"] + t["up"]), size
    b = lem.ffn_perturbation(nu, w, s)
    return measured, b / 2 if weaken == "halved" else b, size


@settings(max_examples=200)
@given(c=ffn_cases)
@pytest.mark.bound
def test_lemma2_ffn(c):
    with torch.no_grad():
        record("Lemma 2 (FFN sub-block)", *lemma2(c))


@pytest.mark.bound
@pytest.mark.parametrize("weaken", ["halved", "first order only"])
def test_lemma2_weakened_is_violated(weaken):
    with torch.no_grad():
        find(ffn_cases, lambda c: violated(f"Lemma 2 {weaken}", *lemma2(c, weaken)),
             settings=FIND)


@pytest.mark.parametrize("name", sorted(lem.ACT_LIPSCHITZ))
def test_activation_lipschitz_constants(name):
    """sup |act'| <= ACT_LIPSCHITZ on a grid of step 1e-4 over [-30, 30] (|act''| <= 1 moves
    the maximum by < 1e-4 between grid points; outside, act' is within 1e-9 of 0 or 1), and
    |act(t)| <= |t| (used by the cap and by Corollary 1)."""
    from skipvision.vision import activation
    t = torch.arange(-30, 30, 1e-4, **f64).requires_grad_()
    y = activation(name)(t)
    (d,) = torch.autograd.grad(y.sum(), t)
    margin = 0.0 if name == "relu" else 1e-4  # relu' is piecewise constant
    assert d.abs().max().item() + margin <= lem.ACT_LIPSCHITZ[name], d.abs().max().item()
    assert bool((y.abs() <= t.abs() + 1e-15).all())


# ---------------------------------------------------------------- Lemma 3: softmax
softmax_cases = st.fixed_dictionaries(dict(
    n=st.integers(2, 8), scale=st.sampled_from([0.0, 1.0, 10.0, 100.0]),
    change=st.sampled_from([1e-8, 1e-3, 0.1, 1.0, 10.0, 1e3]), seed=st.integers(0, 2**16)))


def lemma3(c, weaken=None):
    """(a) the l1 change against the spread; (b) every weight against its interval."""
    g = torch.Generator().manual_seed(c["seed"])
    s = vectors(g, (c["n"],), c["scale"])
    b = vectors(g, (c["n"],), c["change"]).abs()  # |xi_j| <= b_j
    d = float(vectors(g, (1,), c["scale"])) + b * (2 * torch.rand(c["n"], generator=g, **f64) - 1)
    a, a2 = torch.softmax(s, -1), torch.softmax(s + d, -1)
    hi, dev = lem.softmax_intervals(torch.log_softmax(s, -1), b)
    measured = torch.cat([(a2 - a).abs().sum()[None], (a2 - a).abs(), a2])
    bounds = torch.cat([lem.softmax_l1(d.max() - d.min())[None], dev, hi])
    return measured, bounds / 2 if weaken == "halved" else bounds, 2.0


@settings(max_examples=200)
@given(c=softmax_cases)
@pytest.mark.bound
def test_lemma3_softmax(c):
    m, b, size = lemma3(c)
    record("Lemma 3a (softmax, spread)", m[:1], b[:1], size)
    record("Lemma 3b (softmax, intervals)", m[1:c["n"] + 1], b[1:c["n"] + 1], size)
    record("Lemma 3b (softmax, upper ends)", m[c["n"] + 1:], b[c["n"] + 1:], size)


@pytest.mark.bound
def test_lemma3_weakened_is_violated():
    find(softmax_cases, lambda c: violated("Lemma 3 halved", *lemma3(c, "halved")), settings=FIND)


# ---------------------------------------------------------------- Lemma 4: eviction, one head
evict_cases = st.fixed_dictionaries(dict(
    n=st.integers(2, 8), D=st.integers(1, 6), scale=st.sampled_from([0.1, 1.0, 10.0]),
    p=st.sampled_from([0.2, 0.5, 0.8]), seed=st.integers(0, 2**16)))


def lemma4(c, weaken=None):
    g = torch.Generator().manual_seed(c["seed"])
    scores, v = vectors(g, (c["n"],), c["scale"]), vectors(g, (c["n"], c["D"]), 1.0)
    evicted = torch.rand(c["n"], generator=g) < c["p"]
    evicted[torch.randint(c["n"], (1,), generator=g)] = False  # one key stays
    o_full, o_ev, alpha, v_bar = lem.evicted_attention(scores, v, evicted)
    identity = alpha * (v_bar - o_ev)
    assert torch.allclose(o_full - o_ev, identity, rtol=1e-12, atol=1e-14 * (1 + v.abs().max()))
    reach = (v[evicted] - o_ev).norm(dim=-1).max() if evicted.any() else torch.tensor(0.0, **f64)
    b = alpha * reach
    size = o_full.norm() + o_ev.norm()
    return (o_full - o_ev).norm(), b / 2 if weaken == "halved" else b, size


@settings(max_examples=200)
@given(c=evict_cases)
@pytest.mark.bound
def test_lemma4_eviction_identity(c):
    record("Lemma 4 (Skip-KV, one head)", *lemma4(c))


@pytest.mark.bound
def test_lemma4_weakened_is_violated():
    find(evict_cases, lambda c: violated("Lemma 4 halved", *lemma4(c, "halved")), settings=FIND)


# ---------------------------------------------------------------- inputs for Lemmas 5-7, theorems
def positions(g, B, T, n_decode=0, evict_p=0.0, pad=True):
    """Left padding, positions, horizons; with n_decode > 0 also the Skip-KV horizons."""
    pads = torch.randint(0, max(T - n_decode, 1), (B,), generator=g) if pad else torch.zeros(B)
    valid = torch.arange(T)[None] >= pads[:, None]
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    horizon = torch.where(valid, FOREVER, NEVER)
    if not n_decode:
        return pos, horizon, horizon, None
    P = T - n_decode
    evicted = valid & (torch.rand(B, T, generator=g) < evict_p)
    evicted[:, P:] = False
    last = pos[:, :P].amax(1, keepdim=True)
    return pos, horizon, torch.where(evicted, torch.minimum(horizon, last), horizon), evicted


def skips(g, n_layers, B, T, p, per_layer):
    if not per_layer:
        return [torch.rand(B, T, generator=g) < p] * n_layers
    return [torch.rand(B, T, generator=g) < p for _ in range(n_layers)]


layer_cases = st.fixed_dictionaries(dict(
    cfg=text_configs(max_layers=1), w=weight_specs, B=st.integers(1, 2), T=st.integers(1, 8),
    n_decode=st.integers(0, 3), evict_p=st.sampled_from([0.0, 0.5, 1.0]),
    skip_p=st.sampled_from([0.0, 0.3, 1.0]), scale=scales, rel=rels,
    absolute=st.sampled_from([0.0, 1e-5, 0.1, 3.0]), seed=st.integers(0, 2**16)))


def layer_input(c):
    from skipvision.llama import DecoderLayer
    cfg = c["cfg"]
    layer = randomize(DecoderLayer(cfg).double(), c["w"], c["seed"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    B, T = c["B"], c["T"]
    n_decode = c["n_decode"] if c["n_decode"] < T else 0
    pos, hz, hz_new, _ = positions(g, B, T, n_decode, c["evict_p"])
    x = vectors(g, (B, T, cfg.hidden_size), c["scale"])
    x2 = perturb(g, x, c["rel"], c["absolute"])
    masks = attention_mask(pos, pos, hz), attention_mask(pos, pos, hz_new)
    return cfg, layer, g, x, x2, rope_cos_sin(pos, cfg, torch.float64), masks


# ---------------------------------------------------------------- Lemma 5: attention sub-block
def lemma5(c, weaken=None):
    cfg, layer, _, x, x2, (cos, sin), (m_ref, m_new) = layer_input(c)
    att, norm = layer.self_attn, layer.input_layernorm
    a, a2 = att(norm(x), cos, sin, m_ref), att(norm(x2), cos, sin, m_new)
    measured, size = (a2 - a).norm(dim=-1), a.norm(dim=-1) + a2.norm(dim=-1)
    mu = (gainless(x2, cfg.rms_norm_eps) - gainless(x, cfg.rms_norm_eps)).norm(dim=-1)
    _, s = bound.attention_stats(att, norm(x), cos, sin, m_ref, m_new)
    w = lem.weight_norms(layer, cfg)
    if weaken == "no softmax path":
        with mock.patch.object(lem, "softmax_l1", lambda spread: 0 * spread):
            return measured, lem.attention_perturbation(mu, w, s), size
    b = lem.attention_perturbation(mu, w, s)
    return measured, b / 2 if weaken == "halved" else b, size


@settings(max_examples=200)
@given(c=layer_cases)
@pytest.mark.bound
def test_lemma5_attention(c):
    with torch.no_grad():
        record("Lemma 5 (attention sub-block)", *lemma5(c))


@pytest.mark.bound
@pytest.mark.parametrize("weaken", ["halved", "no softmax path"])
def test_lemma5_weakened_is_violated(weaken):
    with torch.no_grad():
        find(layer_cases, lambda c: violated(f"Lemma 5 {weaken}", *lemma5(c, weaken)),
             settings=FIND)


# ---------------------------------------------------------------- Lemma 6: one decoder layer
def lemma6(c, weaken=None):
    cfg, layer, g, x, x2, (cos, sin), (m_ref, m_new) = layer_input(c)
    B, T = x.shape[:2]
    s_ref, s_new = skips(g, 2, B, T, c["skip_p"], True)
    s_ref = s_ref & s_new if c["seed"] % 2 else s_ref  # nested sets, and arbitrary ones
    rows = lambda m: bound.ffn_rows([m])[0] if m.any() else None  # noqa: E731
    a = layer(x, cos, sin, m_ref, ffn_rows=rows(s_ref))
    a2 = layer(x2, cos, sin, m_new, ffn_rows=rows(s_new))
    measured, size = (a2 - a).norm(dim=-1), a.norm(dim=-1) + a2.norm(dim=-1)
    _, s = bound.trace_layer(layer, x, cos, sin, m_ref, m_new, s_ref)
    w = lem.weight_norms(layer, cfg)
    if weaken == "no dropped FFN output":
        s.ffn.dropped = torch.zeros_like(s.ffn.dropped)
    b = lem.layer_step((x2 - x).norm(dim=-1), w, s, s_ref, s_new)[0]
    return measured, b / 2 if weaken == "halved" else b, size


@settings(max_examples=200)
@given(c=layer_cases)
@pytest.mark.bound
def test_lemma6_decoder_layer(c):
    with torch.no_grad():
        record("Lemma 6 (decoder layer)", *lemma6(c))


@pytest.mark.bound
@pytest.mark.parametrize("weaken", ["halved", "no dropped FFN output"])
def test_lemma6_weakened_is_violated(weaken):
    with torch.no_grad():
        find(layer_cases, lambda c: violated(f"Lemma 6 {weaken}", *lemma6(c, weaken)),
             settings=FIND)


# ---------------------------------------------------------------- Lemma 7: final norm and head
head_cases = st.fixed_dictionaries(dict(
    cfg=text_configs(max_layers=1), w=weight_specs, T=st.integers(1, 4), scale=scales,
    rel=rels, absolute=st.sampled_from([0.0, 1e-5, 0.1, 3.0]), seed=st.integers(0, 2**16)))


def lemma7(c, weaken=None):
    cfg = c["cfg"]
    model = randomize(LlamaForCausalLM(cfg).double(), c["w"], c["seed"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    x = vectors(g, (1, c["T"], cfg.hidden_size), c["scale"])
    x2 = perturb(g, x, c["rel"], c["absolute"])
    y, y2 = model.model.norm(x), model.model.norm(x2)
    z, z2 = model.lm_head(y), model.lm_head(y2)
    dl = z2 - z
    measured = torch.stack([(y2 - y).norm(dim=-1), dl.norm(dim=-1), dl.abs().amax(-1)])
    size = torch.stack([y.norm(dim=-1) + y2.norm(dim=-1), z.norm(dim=-1) + z2.norm(dim=-1),
                        z.abs().amax(-1) + z2.abs().amax(-1)])
    hw = lem.head_norms(model.model, model.lm_head, cfg)
    b = torch.stack(lem.head_bound((x2 - x).norm(dim=-1), x.norm(dim=-1), hw))
    return measured, b / 2 if weaken == "halved" else b, size


@settings(max_examples=200)
@given(c=head_cases)
@pytest.mark.bound
def test_lemma7_final_norm_and_head(c):
    with torch.no_grad():
        record("Lemma 7 (final norm, head)", *lemma7(c))


@pytest.mark.bound
def test_lemma7_weakened_is_violated():
    with torch.no_grad():
        find(head_cases, lambda c: violated("Lemma 7 halved", *lemma7(c, "halved")),
             settings=FIND)


# ---------------------------------------------------------------- Theorems 1, 2; Corollaries 1, 2
model_cases = st.fixed_dictionaries(dict(
    cfg=text_configs(max_layers=4), w=weight_specs, B=st.integers(1, 2), T=st.integers(1, 10),
    skip_p=st.sampled_from([0.0, 0.3, 0.7, 1.0]), per_layer=st.booleans(),
    n_decode=st.integers(1, 3), evict_p=st.sampled_from([0.3, 0.7, 1.0]),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 30.0]), seed=st.integers(0, 2**16)))


def model_input(c, kv: bool):
    cfg = c["cfg"]
    model = randomize(LlamaForCausalLM(cfg).double(), c["w"], c["seed"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    B, T = c["B"], c["T"] + (c["n_decode"] if kv else 0)
    pos, horizon, _, evicted = positions(g, B, T, c["n_decode"] if kv else 0, c["evict_p"])
    x = vectors(g, (B, T, cfg.hidden_size), c["scale"])
    skipped = skips(g, cfg.num_hidden_layers, B, T, c["skip_p"], c["per_layer"])
    return model, x, pos, horizon, skipped, evicted


def check_report(name, r, weaken=None):
    """All bounds of a BoundReport hold; records the worst ratios per kind of bound. With
    `weaken` = (what, column) instead: is that bound, halved, violated on some row?"""
    rows, L, v = r.rows(), r.measured.shape[0] - 1, r.valid
    kept = ~r.skip_last if hasattr(r, "skip_last") else v

    def worst(i, col, halve=1.0, tokens=v):
        m, b = rows[i][1], rows[i][col]
        b = (b if torch.is_tensor(b) and b.dim() else torch.full_like(m, float(b))) / halve
        noise = (1e3 if halve > 1 else 1.0) * ATOL * r.sizes[i][tokens]
        return ratio(m[tokens], b[tokens], noise)

    if weaken is not None:
        what, col = weaken
        found = max((worst(i, col, halve=2.0) or 0.0) for i in range(1, len(rows)))
        return violated(f"{name} {what} halved", torch.tensor(found), torch.tensor(1.0))
    assert not r.violations(RTOL, ATOL), r.violations(RTOL, ATOL)
    picks = {"end-to-end (last layer)": (2, [L], v),
             "end-to-end (logits, max)": (2, [L + 3], v),
             "one-step (all layers)": (3, range(1, L + 1), v),
             "a-priori (last layer)": (4, [L], v)}
    if hasattr(r, "skip_last"):  # propagated error only: tokens that keep the last FFN
        picks["end-to-end (last layer, FFN kept)"] = (2, [L], v & kept)
    for label, (col, idx, tokens) in picks.items():
        found = [x for x in (worst(i, col, tokens=tokens) for i in idx) if x is not None]
        DRAWN[f"{name} {label}"] += 1
        if found:
            RATIOS[f"{name} {label}"].append(max(found))
        target(max(found, default=0.0), label=f"{name} {label}")


@settings(max_examples=200)
@given(c=model_cases)
@example(c=dict(cfg=TextConfig(vocab_size=7, hidden_size=4, intermediate_size=6,
                               num_hidden_layers=2, num_attention_heads=2, head_dim=2),
                w=dict(scale=1.0, singular=False, gain=1.0, spread=0.2), B=1, T=1, skip_p=1.0,
                per_layer=False, n_decode=1, evict_p=1.0, scale=1.0, seed=0))  # one token
@example(c=dict(cfg=TextConfig(vocab_size=7, hidden_size=4, intermediate_size=6,
                               num_hidden_layers=2, num_attention_heads=2, head_dim=2),
                w=dict(scale=1.0, singular=False, gain=1.0, spread=0.2), B=2, T=6, skip_p=0.0,
                per_layer=False, n_decode=1, evict_p=1.0, scale=1.0, seed=0))  # nothing skipped
@pytest.mark.bound
def test_theorem1_skip_ffn(c):
    model, x, pos, horizon, skipped, _ = model_input(c, kv=False)
    r = bound.skip_ffn_bound(model, x, pos, skipped, horizon)
    r.skip_last = skipped[-1]
    check_report("Thm 1 Skip-FFN", r)


@settings(max_examples=200)
@given(c=model_cases)
@pytest.mark.bound
def test_theorem2_skip_kv(c):
    model, x, pos, horizon, skipped, evicted = model_input(c, kv=True)
    skipped = skipped if c["seed"] % 2 else None  # with and without Skip-FFN in both runs
    r = bound.skip_kv_bound(model, x, pos, evicted, c["n_decode"], horizon, skipped)
    check_report("Thm 2 Skip-KV", r)


@pytest.mark.bound
@pytest.mark.parametrize("theorem", ["ffn", "kv"])
@pytest.mark.parametrize("what,col", [("end-to-end", 2), ("one-step", 3), ("a-priori", 4)])
def test_theorems_weakened_are_violated(theorem, what, col):
    def fails(c):
        model, x, pos, horizon, skipped, evicted = model_input(c, kv=theorem == "kv")
        if theorem == "ffn":
            r = bound.skip_ffn_bound(model, x, pos, skipped, horizon)
        else:
            r = bound.skip_kv_bound(model, x, pos, evicted, c["n_decode"], horizon)
        return check_report(f"Thm {1 if theorem == 'ffn' else 2}", r, (what, col))
    find(model_cases, fails, settings=settings(FIND, max_examples=600))


# ---------------------------------------------------------------- fast checks (default run)
def tiny(seed=0, layers=2, **kw):
    cfg = TextConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=4, **kw)
    return randomize(LlamaForCausalLM(cfg).double(),
                     dict(scale=1.0, singular=False, gain=1.0, spread=0.2), seed)


def test_trace_is_the_model():
    """The full-run statistics come from the same computation as the model's forward."""
    model = tiny()
    g = torch.Generator().manual_seed(3)
    pos, horizon, _, _ = positions(g, 2, 7)
    x = vectors(g, (2, 7, 8), 1.0)
    skipped = skips(g, 2, 2, 7, 0.5, True)
    outs, _ = bound._run(model.model, x, pos, horizon, bound.ffn_rows(skipped))
    cos, sin = rope_cos_sin(pos, model.cfg, torch.float64)
    mask = attention_mask(pos, pos, horizon)
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            y, _ = bound.trace_layer(layer, outs[i], cos, sin, mask, mask, skipped[i])
        assert torch.allclose(y, outs[i + 1], rtol=0, atol=1e-12), i


def test_eviction_mask_is_the_cache_path():
    """skip_kv_bound's perturbed run (eviction as a horizon) equals prefill, KVCache.keep, then
    decoding with the cache, as generate() does."""
    from skipvision.kv_cache import KVCache
    model = tiny(1, layers=3)
    g = torch.Generator().manual_seed(4)
    B, T, n_dec = 2, 9, 3
    pos, horizon, horizon_new, evicted = positions(g, B, T, n_dec, 0.6)
    x = vectors(g, (B, T, 8), 1.0)
    lm, P = model.model, T - n_dec
    with torch.no_grad():
        _, want = bound._run(lm, x, pos, horizon_new, None)
        cache = KVCache(3)
        lm(x[:, :P], pos[:, :P], horizon[:, :P], cache)
        cache.keep(~evicted[:, :P] & (horizon[:, :P] != NEVER))
        got = lm(x[:, P:], pos[:, P:], horizon[:, P:], cache)
    assert torch.allclose(got, want[:, P:], rtol=0, atol=1e-12)


@settings(max_examples=15)
@given(c=layer_cases)
def test_layer_step_matches_reference_oracle(c):
    """The vectorised Lemma 6 equals reference/bound.py's token-by-token loops."""
    from reference.bound import layer_bound
    cfg, layer, g, x, x2, (cos, sin), (m_ref, m_new) = layer_input(c)
    B, T = x.shape[:2]
    s_ref, s_new = skips(g, 2, B, T, c["skip_p"], True)
    delta = (x2 - x).norm(dim=-1)
    pos = positions(torch.Generator().manual_seed(c["seed"] + 1), B, T,
                    c["n_decode"] if c["n_decode"] < T else 0, c["evict_p"])[0]
    with torch.no_grad():
        _, s = bound.trace_layer(layer, x, cos, sin, m_ref, m_new, s_ref)
        got = lem.layer_step(delta, lem.weight_norms(layer, cfg), s, s_ref, s_new)[0]
        want = layer_bound(layer, cfg, x, pos, m_ref[:, 0], m_new[:, 0], s_ref, s_new, delta)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got - want, got)


def test_bound_smoke():
    """A tiny model: Skip-FFN and Skip-KV bounds hold, and the inputs are validated."""
    model = tiny(2)
    g = torch.Generator().manual_seed(5)
    pos, horizon, _, evicted = positions(g, 2, 8, 2, 0.5)
    x = vectors(g, (2, 8, 8), 1.0)
    sk = torch.zeros(2, 8, dtype=torch.bool)
    sk[:, 2:5] = True
    for r in (bound.skip_ffn_bound(model, x, pos, sk, horizon),
              bound.skip_kv_bound(model, x, pos, evicted, 2, horizon)):
        assert r.measured[-1].max() > 0 and not r.violations(RTOL, ATOL)
    with pytest.raises(ValueError, match="entries"):
        bound.skip_ffn_bound(model, x, pos, [sk], horizon)
    with pytest.raises(ValueError, match="prefill"):
        bound.skip_kv_bound(model, x, pos, sk, 6, horizon)


# ---------------------------------------------------------------- examples/check_bound.py, SmolLM2
TABLES: list[str] = []  # printed in the summary


def check_bound_example():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "check_bound.py"
    spec = importlib.util.spec_from_file_location("check_bound", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_bound_example_runs(tmp_path):
    out = check_bound_example().main(["--out", str(tmp_path / "bound.png")])
    assert (tmp_path / "bound.png").stat().st_size > 0 and not out["ffn"].violations()


@pytest.mark.slow
def test_check_bound_example_loads_a_checkpoint(tmp_path):
    """--model: a saved llava-hf checkpoint (tiny, word-level tokenizer) through
    load_pretrained, the processor and Skip-Vision's prepare, with Skip-KV."""
    import numpy as np
    from PIL import Image
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from skipvision import save_pretrained
    ex = check_bound_example()
    save_pretrained(ex.tiny_llava(1), tmp_path)
    words = ["<unk>", "<pad>", "<s>", "</s>", "USER", ":", "ASSISTANT", "What", "is", "in", "the",
             "image", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    Image.fromarray(np.full((30, 40, 3), 120, dtype=np.uint8)).save(tmp_path / "img.png")
    out = ex.main(["--model", str(tmp_path), "--image", str(tmp_path / "img.png"), "--retained",
                   "10", "--skipped", "20", "--decode", "2", "--out", str(tmp_path / "b.png")])
    assert not out["ffn"].violations() and not out["kv"].violations()
    assert out["ffn"].measured[-1].max() > 0 and out["kv"].measured[-1].max() > 0


def record_real(name, r):
    """Per layer: worst per-token measured/bound and max/max, as ratios over the 30 layers."""
    rows = r.table()
    TABLES.append(f"{name}\n{r.format()}")
    depth = [t for t in rows if t["layer"].isdigit() and t["measured"] > 0]
    for key in ("one_step", "end_to_end"):
        RATIOS[f"{name} {key} per token (layers)"] += [t[f"ratio_{key}"] for t in depth]
        RATIOS[f"{name} {key} max/max (layers)"] += [t["measured"] / t[key] for t in depth]
    for t in rows:
        if not t["layer"].isdigit():
            RATIOS[f"{name} end-to-end {t['layer']}"].append(t["ratio_end_to_end"])


@pytest.mark.real
def test_smollm2_bound():
    """Real SmolLM2-135M weights (30 layers), random visual tokens in the paper's layout,
    Skip-FFN in every layer, then Skip-KV for 3 decode tokens: the bounds hold; the summary
    shows how tight they are at depth 30."""
    from skipvision.gguf import gguf_tokenizer, load_gguf
    ex = check_bound_example()
    model = load_gguf(dtype=torch.float64)
    embeds, pos, horizon, skipped, visual = ex.smollm2_input(model, gguf_tokenizer(), 24, 40,
                                                             "random", 0)
    out = ex.run(model, embeds, pos, horizon, skipped, visual, set(range(30)), 3)
    for name in ("ffn", "kv"):
        assert not out[name].violations(RTOL, ATOL), out[name].violations(RTOL, ATOL)
        assert out[name].measured[-1].max() > 0
        record_real(f"SmolLM2 Skip-{name.upper()}", out[name])
    TABLES.append(f"SmolLM2 FFN update ratio (paper Fig. 1)\n{ex.ratio_table(out)}")


# ---------------------------------------------------------------- summary at the end
class _Summary:
    """Prints median and worst measured/bound per property, and the weakened-bound finds."""

    def pytest_terminal_summary(self, terminalreporter):
        if not RATIOS and not FOUND and not TABLES:
            return
        w = terminalreporter
        w.section("error bound: measured / bound (1 = tight, > 1 = violated)")
        w.write_line("drawn: cases run; error: cases with an error above rounding (their ratios)")
        w.write_line(f"{'property':<52} {'drawn':>6} {'error':>6} {'median':>9} {'worst':>9}")
        for name, r in sorted(RATIOS.items()):
            drawn = DRAWN.get(name, len(r))
            w.write_line(f"{name:<52} {drawn:>6} {len(r):>6} {statistics.median(r):9.3g} "
                         f"{max(r):9.3g}")
        for name, r in sorted(FOUND.items()):
            w.write_line(f"{name + ' (weakened)':<52} {'found':>13} {'':>9} {r:9.4g}")
        for table in TABLES:
            w.write_line("")
            for line in table.splitlines():
                w.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("skipvision-bound-summary"):
        manager.register(_Summary(), "skipvision-bound-summary")
    yield
