"""Every term of the error bound attained (proofs/error_bound.md): for each constant and term,
weights and inputs built by hand on which that term is (nearly) all of the bound and the
measured error reaches it. Each construction asserts measured <= bound (up to float64
rounding) and measured >= RATIO x bound: shrinking the term gives a violation, growing it a
loss of tightness, and either fails here on its own (tests/bound_mutants.py applies such
mistakes to the code and checks that these property tests catch every one).

Notation as in the proof: n(x) the gainless RMSNorm, t* = argmax SiLU' (2.3994, SiLU'(t*) =
1.0998 < 1.1), delta a small input change so that first-order terms dominate.
"""
from __future__ import annotations

import math

import pytest
import torch

from attained_support import T_STAR, check, config, f64, set_weights
from bound_support import gainless
from skipvision.analysis import bound
from skipvision.analysis import bound_lemmas as lem
from skipvision.config import RopeConfig
from skipvision.llama import DecoderLayer, LlamaForCausalLM


# ---------------------------------------------------------------- Lemma 2: the FFN terms
def ffn_case(cfg, weights, h, h2):
    layer = DecoderLayer(cfg).double()
    set_weights(layer, weights)
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    measured = (mlp(norm(h2)) - mlp(norm(h))).norm().item()
    nu = (gainless(h2, cfg.rms_norm_eps) - gainless(h, cfg.rms_norm_eps)).norm(dim=-1)
    w, (_, s) = lem.weight_norms(layer, cfg), bound.ffn_stats(norm, mlp, h)
    return measured, lem.ffn_perturbation(nu, w, s).item(), lem.ffn_terms(nu, w, s)


def nudge(r=1.0, d=1e-7):
    """h = r e1 and h + d e2: the normed input turns by ~d/r, orthogonally to h."""
    return torch.tensor([[[r, 0.0]]], **f64), torch.tensor([[[r, d]]], **f64)


@pytest.mark.bound
def test_gate_path_attains_the_activation_derivative_bound_and_the_gate_row_norm():
    """G at t*: the gate changes by SiLU'(t*) |dG|, |dG| = (largest gate row) x nu."""
    a = 3.0
    m, b, _ = ffn_case(config(), {"mlp.gate_proj.weight": [[0, a], [0, a / 2]],
                                  "mlp.gate_proj.bias": [T_STAR, T_STAR],
                                  "mlp.up_proj.bias": [1.0, 0.0],
                                  "mlp.down_proj.weight": [[1, 0], [0, 0]]}, *nudge())
    check("Lemma 2 gate path: c_sigma, gate row norm", m, b, 0.999)


@pytest.mark.bound
def test_up_path_is_attained():
    m, b, _ = ffn_case(config(), {"mlp.gate_proj.bias": [4.0, 0.0],
                                  "mlp.up_proj.weight": [[0, 2.0], [0, 0]],
                                  "mlp.down_proj.weight": [[1, 0], [0, 0]]}, *nudge())
    check("Lemma 2 up path", m, b, 0.999)


@pytest.mark.bound
def test_second_order_term_is_attained():
    """ReLU, G = U = 0 at the full run: only dG * dU is left."""
    m, b, t = ffn_case(config(hidden_act="relu"), {"mlp.gate_proj.weight": [[0, 2.0], [0, 0]],
                                                   "mlp.up_proj.weight": [[0, 3.0], [0, 0]],
                                                   "mlp.down_proj.weight": [[1, 0], [0, 0]]},
                       *nudge(d=1e-3))
    assert float(t["gate"]) == 0 and float(t["up"]) == 0
    check("Lemma 2 second-order term", m, b, 0.999)


@pytest.mark.bound
def test_the_cap_is_attained_and_needs_the_full_runs_output():
    """ReLU. (a) from n(h) ~ 0 to the largest normed input: the cap's second part, attained.
    (b) the output turns from +3ac C to -ac C: measured 4/6 of the cap, above its second
    part alone (so the cap without the full run's output fails)."""
    a, c, C = 2.0, 3.0, 2
    w = {"mlp.gate_proj.weight": [[0, a], [0, 0]], "mlp.up_proj.weight": [[0, c], [0, 0]],
         "mlp.down_proj.weight": [[1, 0], [0, 0]]}
    m, b, t = ffn_case(config(hidden_act="relu"), w, torch.tensor([[[0.0, 1e-9]]], **f64),
                       torch.tensor([[[0.0, 1e4]]], **f64))
    check("Lemma 2 cap (from zero)", m, b, 0.999)
    w["mlp.gate_proj.bias"] = [2 * a * math.sqrt(C), 0]
    m, b, t = ffn_case(config(hidden_act="relu"), w, torch.tensor([[[0.0, 1e4]]], **f64),
                       torch.tensor([[[0.0, -1e4]]], **f64))
    assert float(t["cap"]) == pytest.approx(b) and m > 1.3 * (b - float(t["cap"]) / 2)
    check("Lemma 2 cap (sign flip)", m, b, 0.66)


# ---------------------------------------------------------------- Lemma 3: softmax
@pytest.mark.bound
def test_half_spread_and_the_cap_of_two_are_attained():
    eta = 1e-6
    s, d = torch.zeros(2, **f64), torch.tensor([eta, -eta], **f64)
    m = (torch.softmax(s + d, -1) - torch.softmax(s, -1)).abs().sum().item()
    check("Lemma 3a half-spread", m, lem.softmax_l1(d.max() - d.min()).item(), 0.999)
    s, d = torch.tensor([40.0, 0.0], **f64), torch.tensor([-80.0, 0.0], **f64)
    m = (torch.softmax(s + d, -1) - torch.softmax(s, -1)).abs().sum().item()
    check("Lemma 3a cap 2", m, lem.softmax_l1(d.max() - d.min()).item(), 0.999)


@pytest.mark.bound
def test_interval_ends_are_attained():
    """A key of tiny weight rising (upper end); a key of weight 0.9 falling while its upper
    end is clamped at 1 (lower end)."""
    bb = torch.full((3,), 0.5, **f64)
    s = torch.tensor([-30.0, 0.0, 0.0], **f64)
    hi, dev = lem.softmax_intervals(torch.log_softmax(s, -1), bb)
    up = torch.softmax(s + torch.tensor([0.5, -0.5, -0.5], **f64), -1)
    check("Lemma 3b upper end", up[0].item(), hi[0].item(), 0.999, 1.0)
    s, bb = torch.tensor([0.9, 0.1], **f64).log(), torch.full((2,), 3.0, **f64)
    hi, dev = lem.softmax_intervals(torch.log_softmax(s, -1), bb)  # hi clamps at 1 here
    a = torch.softmax(s, -1)
    down = torch.softmax(s + torch.tensor([-3.0, 3.0], **f64), -1)
    check("Lemma 3b lower end", (a[0] - down[0]).item(), dev[0].item(), 0.97, 1.0)


# ---------------------------------------------------------------- Lemma 5: attention sub-block
NO_ROPE = RopeConfig(rope_type="linear", factor=1 / (2 * math.pi))  # every angle 2 pi p


def attention_case(cfg, weights, x, x2):
    """Lemma 5 for the last token: measured change of the attention output and the bound."""
    from skipvision.kv_cache import FOREVER
    from skipvision.llama import attention_mask, rope_cos_sin
    layer = DecoderLayer(cfg).double()
    set_weights(layer, weights)
    T = x.shape[1]
    pos = torch.arange(T)[None]
    cos, sin = rope_cos_sin(pos, cfg, torch.float64)
    mask = attention_mask(pos, pos, torch.full_like(pos, FOREVER))
    att, norm = layer.self_attn, layer.input_layernorm
    a, a2 = att(norm(x), cos, sin, mask), att(norm(x2), cos, sin, mask)
    mu = (gainless(x2, cfg.rms_norm_eps) - gainless(x, cfg.rms_norm_eps)).norm(dim=-1)
    _, st = bound.attention_stats(att, norm(x), cos, sin, mask, mask)
    b = lem.attention_perturbation(mu, lem.weight_norms(layer, cfg), st)
    return (a2 - a)[0, -1].norm().item(), b[0, -1].item()


def anchors(n: int, R: float = 1e3) -> torch.Tensor:
    """n tokens at +-R e2, alternating."""
    sign = torch.tensor([(-1.0) ** j for j in range(n)], **f64)
    return sign[:, None] * torch.tensor([[0.0, R, 0.0]], **f64)


@pytest.mark.bound
def test_query_change_drives_the_softmax_path():
    """The query moves (input 0 -> d e3); n keys at +-K (key spread), values at +-V: the
    output moves by ~ n/(n+1) tau V, the softmax path through the query term."""
    n, d = 40, 1e-6
    cfg = config(hidden_size=3, rope=NO_ROPE)
    w = {"self_attn.q_proj.weight": [[0, 0, 100.0], [0, 0, 0]],
         "self_attn.k_proj.weight": [[0, 1.0, 0], [0, 0, 0]],
         "self_attn.v_proj.weight": [[0, 1.0, 0], [0, 0, 0]],
         "self_attn.o_proj.weight": [[1.0, 0], [0, 1.0], [0, 0]]}
    x = torch.cat([anchors(n), torch.zeros(1, 3, **f64)])[None]
    x2 = x.clone()
    x2[0, -1, 2] = d
    check("Lemma 5 softmax path via the query change", *attention_case(cfg, w, x, x2), 0.95)


def key_case(q_scale: float, k_scale: float, mu_q: float, mu_k: float, R: float = 1e3):
    """n keys, all 0 in the full run (no key spread), values at +-V; each key moves by mu_k
    (up or down with its value's sign), the query's input by mu_q (normed units)."""
    n = 40
    cfg = config(hidden_size=3, rope=NO_ROPE)
    w = {"self_attn.q_proj.weight": [[0, 0, q_scale], [0, 0, 0]],
         "self_attn.k_proj.weight": [[k_scale, 0, 0], [0, 0, 0]],
         "self_attn.v_proj.weight": [[0, 1.0, 0], [0, 0, 0]],
         "self_attn.o_proj.weight": [[1.0, 0], [0, 1.0], [0, 0]]}
    query = torch.tensor([[0.0, 0, R if mu_q == 0 else 0]], **f64)
    x = torch.cat([anchors(n, R), query])[None]
    x2 = x.clone()
    x2[0, :n, 0] = torch.sign(x[0, :n, 1]) * mu_k * R / math.sqrt(3)
    x2[0, -1, 2] += mu_q * math.sqrt(cfg.rms_norm_eps)  # from 0: n moves by ~ mu_q
    return attention_case(cfg, w, x, x2)


@pytest.mark.bound
def test_key_changes_drive_the_softmax_path():
    """(a) A fixed query of norm |q|: the scores move by <q, dk_j>, the key term. (b) A query
    at 0 that moves too: the scores move by <dq, dk_j>, the key term with the perturbed query's
    norm (its change included); its own key moves ~mu_q, kept far below the others'."""
    check("Lemma 5 key term (fixed query)", *key_case(10.0, 100.0, 0.0, 1e-5), 0.95)
    check("Lemma 5 key term (moving query)", *key_case(3e4, 3e4, 1e-7, 1e-5), 0.9)


@pytest.mark.bound
def test_two_heads_add_in_root_sum_square():
    """One token, two heads reading the same input direction into orthogonal outputs: the
    value path of each is attained and W_o adds them as sqrt(b1^2 + b2^2)."""
    cfg = config(hidden_size=4, num_attention_heads=2, num_key_value_heads=2, rope=NO_ROPE)
    w = {"self_attn.v_proj.weight": [[3.0, 0, 0, 0], [0, 0, 0, 0], [4.0, 0, 0, 0], [0, 0, 0, 0]],
         "self_attn.o_proj.weight": torch.eye(4, **f64)}
    x = torch.tensor([[[0.0, 0, 0, 1.0]]], **f64)
    x2 = x + torch.tensor([1e-7, 0, 0, 0], **f64)
    check("Lemma 5 heads (root-sum-square)", *attention_case(cfg, w, x, x2), 0.999)


@pytest.mark.bound
def test_attention_moving_onto_a_changed_value_is_the_value_path():
    """The query first attends to A (key far above B's); B's key jumps above A's while B's
    value moves and A's does not, and A and B had equal values: the output moves by ~ the
    weight B gains times B's value change, which the value path's tau/2 and hi terms cover
    (the full-run weights alone would not)."""
    cfg = config(hidden_size=3, rope=NO_ROPE)
    w = {"self_attn.q_proj.weight": [[0, 0, 10.0], [0, 0, 0]],
         "self_attn.k_proj.weight": [[1e3, 0, 0], [0, 0, 0]],
         "self_attn.v_proj.weight": [[0, 1.0, 0], [0, 0, 0]],
         "self_attn.o_proj.weight": [[1.0, 0], [0, 1.0], [0, 0]]}
    R = 1e3
    x = torch.tensor([[[0.02 * R, 0, R], [-0.02 * R, 0, R], [0, 0, R]]], **f64)  # A, B, query
    x2 = x.clone()
    x2[0, 1, 0], x2[0, 1, 1] = 0.04 * R, 0.3 * R  # B: key above A's, value moved
    m, b = attention_case(cfg, w, x, x2)
    check("Lemma 5 value path (attention onto a moved value)", m, b, 0.5)


# ---------------------------------------------------------------- Lemma 7: final norm and head
@pytest.mark.bound
def test_head_bounds_are_attained_in_l2_and_l_inf():
    """Two parallel rows: the spectral norm (sqrt 2 a) is the l2 constant, the largest row (a)
    the l-infinity one; the normed input turns along them."""
    cfg, a = config(), 5.0
    model = LlamaForCausalLM(cfg).double()
    set_weights(model, {"lm_head.weight": [[a, 0], [a, 0], [0, 0], [0, 0]]})
    x, x2 = torch.tensor([[[0.0, 1.0]]], **f64), torch.tensor([[[1e-7, 1.0]]], **f64)
    z, z2 = (model.lm_head(model.model.norm(t)) for t in (x, x2))
    hw = lem.head_norms(model.model, model.lm_head, cfg)
    _, l2, linf = lem.head_bound((x2 - x).norm(dim=-1), x.norm(dim=-1), hw)
    check("Lemma 7 logits, l2 (spectral norm)", (z2 - z).norm().item(), l2.item(), 0.999)
    check("Lemma 7 logits, l-inf (largest row)", (z2 - z).abs().max().item(), linf.item(), 0.999)
