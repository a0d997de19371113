"""Shared pieces of the error-bound property tests (proofs/error_bound.md): strategies and
builders, the recording of measured/bound ratios, and the summary printed at the end of a run.

Float64 rounding: a bound holds if measured <= bound (1 + RTOL) + ATOL (|a| + |b|), where a and
b are the two computed values whose difference is measured (unit roundoff 1.1e-16).
"""

import math
import os
import statistics
from collections import defaultdict

import torch
from hypothesis import Phase, settings, target
from hypothesis import strategies as st

from skipvision.config import RopeConfig, TextConfig
from skipvision.kv_cache import slots
from skipvision.llama import LlamaForCausalLM, attention_mask, rope_cos_sin

RTOL, ATOL = 1e-9, 1e-12
# Drawn cases per property test (tests/bound_mutants.py lowers it for its many runs).
EXAMPLES = int(os.environ.get("BOUND_EXAMPLES", "1200"))
ATTAINED: dict[str, float] = {}  # hand-built construction -> measured / bound
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


# ---------------------------------------------------------------- inputs for Lemmas 5-7, theorems
def positions(g, B, T, n_decode=0, evict_p=0.0, pad=True):
    """Left padding, positions, horizons; with n_decode > 0 also the Skip-KV horizons."""
    pads = torch.randint(0, max(T - n_decode, 1), (B,), generator=g) if pad else torch.zeros(B)
    valid = torch.arange(T)[None] >= pads[:, None]
    pos, horizon = slots(valid)
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


# ---------------------------------------------------------------- fast checks (default run)
def tiny(seed=0, layers=2, **kw):
    cfg = TextConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=4, **kw)
    return randomize(LlamaForCausalLM(cfg).double(),
                     dict(scale=1.0, singular=False, gain=1.0, spread=0.2), seed)


# ---------------------------------------------------------------- examples/check_bound.py, SmolLM2
TABLES: list[str] = []  # printed in the summary


def check_bound_example():
    from helpers import example_module
    return example_module("check_bound")



# ---------------------------------------------------------------- summary at the end
class BoundSummary:
    """Prints median and worst measured/bound per property, and the weakened-bound finds."""

    def pytest_terminal_summary(self, terminalreporter):
        if not RATIOS and not FOUND and not TABLES and not ATTAINED:
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
        if RATIOS:
            total = sum(DRAWN.get(n, len(r)) for n, r in RATIOS.items())
            w.write_line(f"{'total drawn':<52} {total:>6}")
        if ATTAINED:
            w.write_line("")
            w.write_line("built by hand to attain each term, and the adversary: measured / bound")
        for name, r in ATTAINED.items():
            w.write_line(f"{name:<64} {r:9.5f}")
        for table in TABLES:
            w.write_line("")
            for line in table.splitlines():
                w.write_line(line)
