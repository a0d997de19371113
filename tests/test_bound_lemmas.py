"""Property tests of the Skip-FFN / Skip-KV error bound (proofs/error_bound.md).

Hypothesis draws the structure (depth, width, heads and KV heads, tokens, padding, which rows
skip the FFN in which layers, which keys are evicted, weight scales including large and nearly
singular matrices, RMSNorm gains and eps); a seed draws the numbers. Everything is float64, so
the measured error is the method's error and a bound must hold up to rounding (RTOL).
Each lemma (1-7) is checked on its own here; test_bound_theorems.py checks the theorems;
`target(measured / bound)` steers the search toward tight cases. For every lemma a weakened
bound (a constant halved, a term dropped) must be violated on an example Hypothesis finds, so
these checks can fail. The session prints median and worst measured/bound ratios.
"""

import math
from unittest import mock

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from reference.bound import evicted_attention
from skipvision.analysis import bound
from skipvision.analysis import bound_lemmas as lem
from skipvision.llama import LlamaForCausalLM

from bound_support import (
    ATOL, EXAMPLES, FIND, RTOL, f64, gainless, layer_cases, layer_input, perturb, positions, randomize,
    record, rels, scales, skips, text_configs, tiny, vectors, violated, weight_specs)

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


# ---------------------------------------------------------------- Lemma 4: eviction, one head
evict_cases = st.fixed_dictionaries(dict(
    n=st.integers(2, 8), D=st.integers(1, 6), scale=st.sampled_from([0.1, 1.0, 10.0]),
    p=st.sampled_from([0.2, 0.5, 0.8]), seed=st.integers(0, 2**16)))


def lemma4(c, weaken=None):
    g = torch.Generator().manual_seed(c["seed"])
    scores, v = vectors(g, (c["n"],), c["scale"]), vectors(g, (c["n"], c["D"]), 1.0)
    evicted = torch.rand(c["n"], generator=g) < c["p"]
    evicted[torch.randint(c["n"], (1,), generator=g)] = False  # one key stays
    o_full, o_ev, alpha, v_bar = evicted_attention(scores, v, evicted)
    identity = alpha * (v_bar - o_ev)
    assert torch.allclose(o_full - o_ev, identity, rtol=1e-12, atol=1e-14 * (1 + v.abs().max()))
    reach = (v[evicted] - o_ev).norm(dim=-1).max() if evicted.any() else torch.tensor(0.0, **f64)
    b = alpha * reach
    size = o_full.norm() + o_ev.norm()
    return (o_full - o_ev).norm(), b / 2 if weaken == "halved" else b, size


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


# ---------------------------------------------------------------- every lemma, as a table
LEMMAS = {  # name: (drawn cases, measured and bound of one case, weakened variants)
    "Lemma 1 (RMSNorm)": (lemma1_cases, lemma1, ["halved", "no ball"]),
    "Lemma 2 (FFN sub-block)": (ffn_cases, lemma2, ["halved", "first order only"]),
    "Lemma 3 (softmax)": (softmax_cases, lemma3, ["halved"]),
    "Lemma 4 (Skip-KV, one head)": (evict_cases, lemma4, ["halved"]),
    "Lemma 5 (attention sub-block)": (layer_cases, lemma5, ["halved", "no softmax path"]),
    "Lemma 6 (decoder layer)": (layer_cases, lemma6, ["halved", "no dropped FFN output"]),
    "Lemma 7 (final norm, head)": (head_cases, lemma7, ["halved"]),
}


def summary_rows(name, c, measured, bound_, size):
    """The summary rows of one case; Lemma 3 reports (a) and (b)'s two parts apart."""
    if not name.startswith("Lemma 3"):
        return {name: (measured, bound_, size)}
    n = c["n"]
    return {"Lemma 3a (softmax, spread)": (measured[:1], bound_[:1], size),
            "Lemma 3b (softmax, intervals)": (measured[1:n + 1], bound_[1:n + 1], size),
            "Lemma 3b (softmax, upper ends)": (measured[n + 1:], bound_[n + 1:], size)}


@pytest.mark.bound
@pytest.mark.parametrize("name", LEMMAS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_lemma_holds(name, data):
    cases, lemma, _ = LEMMAS[name]
    c = data.draw(cases, label="case")
    with torch.no_grad():
        for row, args in summary_rows(name, c, *lemma(c)).items():
            record(row, *args)


@pytest.mark.bound
@pytest.mark.parametrize("name, weaken", [(n, w) for n, (_, _, ws) in LEMMAS.items() for w in ws])
def test_weakened_lemma_is_violated(name, weaken):
    """The same check fails once a constant is halved or a term dropped: it can fail."""
    cases, lemma, _ = LEMMAS[name]
    with torch.no_grad():
        find(cases, lambda c: violated(f"{name} {weaken}", *lemma(c, weaken)), settings=FIND)


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
        out, s = bound.trace_layer(layer, x, cos, sin, m_ref, m_new, s_ref)
        got = lem.layer_step(delta, lem.weight_norms(layer, cfg), s, s_ref, s_new)[0]
        want = layer_bound(layer, cfg, x, pos, m_ref[:, 0], m_new[:, 0], s_ref, s_new, delta)
    # the two sum in different orders: rounding scales with the layer's activations, not 1
    size = 1 + x.abs().max() + out.abs().max()
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-13 * size), (got - want, got, size)


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


