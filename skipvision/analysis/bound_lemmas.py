"""The lemmas of proofs/error_bound.md as functions (used by bound.py; tested one by one).

Notation: n(x) = sqrt(C) x / sqrt(|x|^2 + C eps) is RMSNorm without its gain g; the gain is
folded into the next linear map (W diag(g)), which is what makes these bounds tight on real
checkpoints whose gains vary a lot between channels. All norms are float64; spectral norms
come from torch.linalg.matrix_norm(W, 2).

Shapes: B batch, T tokens, H heads, G kv heads, D head dim, C width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# sup_t |act'(t)|, rounded up (Lemma 2); certified in proofs/error_bound.md, checked in tests.
ACT_LIPSCHITZ = {"silu": 1.1, "quick_gelu": 1.1, "relu": 1.0, "gelu": 1.13,
                 "gelu_pytorch_tanh": 1.13}


def rmsnorm_perturbation(xn, delta, eps: float, C: int):
    """Lemma 1: max ||n(x) - n(y)|| over ||y - x|| <= delta, given xn = ||x||.

    min( 2 sqrt(C) delta / (sqrt(|x|^2 + C eps) + sqrt(((|x| - delta)_+)^2 + C eps)),
         ||n(x)|| + sqrt(C) ).  Times max|g| it bounds the change of the RMSNorm output.
    """
    rc, ce = math.sqrt(C), C * eps
    sx = (xn**2 + ce).sqrt()
    lo = ((xn - delta).clamp(min=0) ** 2 + ce).sqrt()
    return torch.minimum(2 * rc * delta / (sx + lo), rc * xn / sx + rc)


def softmax_l1(spread):
    """Lemma 3: ||softmax(s + d) - softmax(s)||_1 <= min(2, (max d - min d) / 2)."""
    return (spread / 2).clamp(max=2)


@dataclass
class WeightNorms:
    """Norms of one decoder layer's weights, RMSNorm gains folded into the next map."""
    q: torch.Tensor  # (H,) ||W_q^h diag(g1)||_2 per query head
    k: torch.Tensor  # (G,) ||W_k^g diag(g1)||_2
    v: torch.Tensor  # (G,) ||W_v^g diag(g1)||_2
    ov: torch.Tensor  # (H,) ||W_o^h W_v^g(h) diag(g1)||_2 (value path in output space)
    o: float  # ||W_o||_2
    gate: float  # ||W_g diag(g2)||_2
    up: float  # ||W_u diag(g2)||_2
    gate_row: float  # max row norm of W_g diag(g2): ||W_g diag(g2) z||_inf <= gate_row ||z||
    up_row: float
    down: float  # ||W_d||_2
    bias: dict  # bias norms: q (H,), k (G,), v (G,), gate_inf, gate_two, up_inf, up_two
    eps: float
    width: int
    head_dim: int
    act: str


def spectral_norm(W):
    """||W||_2 of (..., m, n) matrices: the root of the top eigenvalue of the smaller Gram
    matrix (equals torch.linalg.matrix_norm(W, 2); several times faster on CPU)."""
    W = W.double()
    gram = W.mT @ W if W.shape[-2] >= W.shape[-1] else W @ W.mT
    return torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0).sqrt()


def product_norm(A, B):
    """||A B||_2 for A (..., m, d), B (..., d, n), d small: with A = Qa Ra and B^T = Qb Rb,
    ||A B|| = ||Ra Rb^T|| (d x d)."""
    return spectral_norm(torch.linalg.qr(A.double())[1] @ torch.linalg.qr(B.double().mT)[1].mT)



def _w(lin):
    return lin.weight.detach().double()


def _bias(lin, n):
    b = lin.bias
    return torch.zeros(n, 1, dtype=torch.float64) if b is None else b.detach().double().view(n, -1)


def weight_norms(layer, cfg) -> WeightNorms:
    a, m = layer.self_attn, layer.mlp
    H, G, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    g1 = layer.input_layernorm.weight.detach().double()
    g2 = layer.post_attention_layernorm.weight.detach().double()
    wv = (_w(a.v_proj) * g1).view(G, D, C)
    wo = _w(a.o_proj).view(C, H, D).transpose(0, 1)  # (H, C, D): W_o^h
    wg, wu = _w(m.gate_proj) * g2, _w(m.up_proj) * g2
    bg, bu = _bias(m.gate_proj, 1), _bias(m.up_proj, 1)
    bias = dict(q=_bias(a.q_proj, H).norm(dim=-1), k=_bias(a.k_proj, G).norm(dim=-1),
                v=_bias(a.v_proj, G).norm(dim=-1), gate_inf=bg.abs().max().item(),
                gate_two=bg.norm().item(), up_inf=bu.abs().max().item(), up_two=bu.norm().item())
    spec = spectral_norm
    return WeightNorms(
        q=spec((_w(a.q_proj) * g1).view(H, D, C)), k=spec((_w(a.k_proj) * g1).view(G, D, C)),
        v=spec(wv), ov=product_norm(wo, wv.repeat_interleave(H // G, 0)),
        o=spec(_w(a.o_proj)).item(), gate=spec(wg).item(), up=spec(wu).item(),
        gate_row=wg.norm(dim=1).max().item(), up_row=wu.norm(dim=1).max().item(),
        down=spec(_w(m.down_proj)).item(), bias=bias,
        eps=cfg.rms_norm_eps, width=C, head_dim=D, act=cfg.hidden_act)


@dataclass
class AttnStats:
    """What Lemma 5 reads from the full run, under the perturbed run's mask (the 'hybrid' run:
    full-run queries, keys and values, perturbed visibility). Per query i and key j; entries
    of keys i does not see are 0 (log_attn: -inf). Everything float64."""
    q_norm: torch.Tensor  # (B, H, T) ||q_i|| (RoPE keeps norms)
    k_dist: torch.Tensor  # (B, H, T, T) ||k_j - mean of the keys i sees||
    log_attn: torch.Tensor  # (B, H, T, T) log softmax weights
    attn: torch.Tensor  # (B, H, T, T) softmax weights
    v_dist_o: torch.Tensor  # (B, H, T, T) ||v_j - o_i||
    v_dist_m: torch.Tensor  # (B, H, T, T) ||v_j - mean of the values i sees||
    o_norm: torch.Tensor  # (B, H, T) ||o_i||
    ov_dist_o: torch.Tensor  # (B, H, T, T) ||W_o^h (v_j - o_i)||
    ov_dist_m: torch.Tensor  # (B, H, T, T) ||W_o^h (v_j - mean)||
    mask: torch.Tensor  # (B, 1, T, T) the perturbed run's mask
    evict: torch.Tensor  # (B, T) ||W_o (o_hybrid - o_full)|| (Lemma 4), 0 without eviction


@dataclass
class FfnStats:
    """What Lemma 2 reads from the full run's FFN sub-block, z = RMSNorm(h) (float64)."""
    g_inf: torch.Tensor  # (B, T) ||W_g z||_inf
    g_two: torch.Tensor  # (B, T) ||W_g z||_2
    u_inf: torch.Tensor  # (B, T) ||W_u z||_inf
    u_two: torch.Tensor  # (B, T) ||W_u z||_2
    a_inf: torch.Tensor  # (B, T) ||act(W_g z)||_inf
    a_two: torch.Tensor
    dropped: torch.Tensor  # (B, T) ||FFN(z)||, what Skip-FFN drops
    core: torch.Tensor  # (B, T) ||W_d (act(W_g z) * W_u z)|| = ||FFN(z) - b_d||
    ratio: torch.Tensor  # (B, T) ||FFN(z)|| / ||h|| (paper Fig. 1)


@dataclass
class LayerStats:
    x_norm: torch.Tensor  # (B, T) ||x_j||, layer input
    h_norm: torch.Tensor  # (B, T) ||h_j||, FFN sub-block input
    attn: AttnStats
    ffn: FfnStats


def softmax_intervals(log_a, b):
    """Lemma 3(b): a = softmax(s) (log_a: -inf off the visible keys); if s~ - s = c + xi with
    |xi_j| <= b_j, then lo_j <= a~_j <= hi_j with hi_j = min(1, a_j e^b_j / sum_k a_k e^-b_k)
    and lo_j = a_j e^-b_j / sum_k a_k e^b_k. Returns hi and dev_j = max(hi_j - a_j, a_j - lo_j)
    >= |a~_j - a_j|, over the last dimension."""
    hi = (log_a + b - torch.logsumexp(log_a - b, -1, keepdim=True)).clamp(max=0).exp()
    lo = (log_a - b - torch.logsumexp(log_a + b, -1, keepdim=True)).exp()
    a = log_a.exp()
    return hi, torch.maximum(hi - a, a - lo)


def _paths(w_head, mu, s, tau, hi, dev, dist_o, dist_m):
    """Lemma 5, one linear image of the values (v, or W_o^h v): softmax path plus value path
    per head and query, given ||d v_j|| <= w_head[h] mu_j. -> (B, H, T)."""
    dv = torch.where(s.mask, (w_head[None, :, None] * mu[:, None])[:, :, None, :], 0)
    dv_max = dv.amax(-1)  # (B, H, T)
    value = torch.minimum(torch.minimum(dv_max, (s.attn * dv).sum(-1) + tau / 2 * dv_max),
                          (hi * dv).sum(-1))
    reach_o, reach_m = dist_o.amax(-1), dist_m.amax(-1)
    soft = torch.minimum(tau * torch.minimum(reach_o, reach_m),
                         torch.minimum((dev * dist_o).sum(-1), (dev * dist_m).sum(-1)))
    return torch.minimum(soft + value, reach_o + dv_max)


def attention_perturbation(mu, w: WeightNorms, s: AttnStats):
    """Lemma 5: bound on ||attn(u~; M~)_i - attn(u; M)_i|| given ||n(x~_j) - n(x_j)|| <= mu_j.

    = eviction term (Lemma 4, exact from the full run) + the change over the same keys:
    scores (RoPE is an isometry) -> softmax (Lemma 3) -> softmax and value paths, through
    ||W_o|| on all heads at once or head by head in output space, whichever is smaller.
    mu (B, T) -> (B, T).
    """
    H, G = w.q.shape[0], w.k.shape[0]
    rc = math.sqrt(w.width)
    dq = w.q[None, :, None] * mu[:, None]  # (B, H, T)
    q_tilde = torch.minimum(s.q_norm + dq, (w.q * rc + w.bias["q"])[None, :, None])
    dk = (w.k.repeat_interleave(H // G)[None, :, None] * mu[:, None])[:, :, None, :]
    b = (dq[..., None] * s.k_dist + q_tilde[..., None] * dk) / math.sqrt(w.head_dim)
    b = torch.where(s.mask, b, 0)  # (B, H, T, T): |score change - common shift| <= b
    hi, dev = softmax_intervals(s.log_attn, b)
    tau = torch.minimum(softmax_l1(2 * b.amax(-1)), dev.sum(-1))  # >= ||a~_i - a_i||_1
    wv = w.v.repeat_interleave(H // G)
    beta = torch.minimum(_paths(wv, mu, s, tau, hi, dev, s.v_dist_o, s.v_dist_m),
                         (wv * rc + w.bias["v"].repeat_interleave(H // G))[None, :, None]
                         + s.o_norm)
    beta_out = _paths(w.ov, mu, s, tau, hi, dev, s.ov_dist_o, s.ov_dist_m)
    return s.evict + torch.minimum(w.o * beta.pow(2).sum(1).sqrt(), beta_out.sum(1))


def ffn_terms(nu, w: WeightNorms, s: FfnStats) -> dict:
    """Lemma 2's terms, per token, for ||n(h~) - n(h)|| <= nu (gains folded into W_g, W_u):
    gate path c ||dG * U||, up path ||act(G) * dU||, second order c ||dG * dU||, and the
    cap ||W_d (act(G) * U)|| + ||W_d (act(G~) * U~)|| (|act(t)| <= |t|, Hoelder both ways)."""
    c = ACT_LIPSCHITZ[w.act]
    rc, b = math.sqrt(w.width), w.bias
    full = lambda t: torch.full_like(nu, t)  # noqa: E731
    g_inf = torch.minimum(s.g_inf + w.gate_row * nu, full(w.gate_row * rc + b["gate_inf"]))
    g_two = torch.minimum(s.g_two + w.gate * nu, full(w.gate * rc + b["gate_two"]))
    u_inf = torch.minimum(s.u_inf + w.up_row * nu, full(w.up_row * rc + b["up_inf"]))
    u_two = torch.minimum(s.u_two + w.up * nu, full(w.up * rc + b["up_two"]))
    return dict(gate=c * nu * torch.minimum(w.gate * s.u_inf, w.gate_row * s.u_two),
                up=nu * torch.minimum(w.up * s.a_inf, w.up_row * s.a_two),
                second=c * nu**2 * min(w.gate_row * w.up, w.gate * w.up_row),
                cap=s.core + w.down * torch.minimum(g_inf * u_two, g_two * u_inf))


def ffn_perturbation(nu, w: WeightNorms, s: FfnStats):
    """Lemma 2: bound on ||F(z~) - F(z)||, F(z) = W_d (act(W_g z) * W_u z), z = RMSNorm(h),
    given ||n(h~) - n(h)|| <= nu: ||W_d|| (gate + up + second order), or the cap."""
    t = ffn_terms(nu, w, s)
    return torch.minimum(w.down * (t["gate"] + t["up"] + t["second"]), t["cap"])


def layer_step(delta, w: WeightNorms, s: LayerStats, skip_ref, skip_new):
    """Lemma 6: one decoder layer. delta (B, T) bounds ||x~_j - x_j|| at the layer input;
    returns the bound at its output, and eta, the bound on ||h~_j - h_j||.
    """
    mu = rmsnorm_perturbation(s.x_norm, delta, w.eps, w.width)
    eta = delta + attention_perturbation(mu, w, s.attn)
    d_ffn = ffn_perturbation(rmsnorm_perturbation(s.h_norm, eta, w.eps, w.width), w, s.ffn)
    out = eta + torch.where(~skip_ref & ~skip_new, d_ffn, 0)
    out = out + torch.where(skip_ref != skip_new, s.ffn.dropped, 0)
    return out + torch.where(skip_ref & ~skip_new, d_ffn, 0), eta


@dataclass
class HeadNorms:
    gain: float  # max |g_f| of the final norm
    eps: float
    width: int
    head: float  # ||W_head diag(g_f)||_2 (inf without a head)
    head_row: float  # max row norm of W_head diag(g_f)


def head_norms(lm, head, cfg) -> HeadNorms:
    g = lm.norm.weight.detach().double()
    W = None if head is None else _w(head) * g
    return HeadNorms(g.abs().max().item(), cfg.rms_norm_eps, cfg.hidden_size,
                     math.inf if W is None else spectral_norm(W).item(),
                     math.inf if W is None else W.norm(dim=1).max().item())


def head_bound(delta, xn, w: HeadNorms):
    """Lemma 7: final RMSNorm and lm_head, given ||x~_L - x_L|| <= delta and xn = ||x_L||.
    Returns per-token bounds on ||y~ - y||, ||logits~ - logits||_2 and ||...||_inf."""
    mu = rmsnorm_perturbation(xn, delta, w.eps, w.width)
    return w.gain * mu, w.head * mu, w.head_row * mu


def apriori_constants(w: WeightNorms):
    """Corollary 1: global Lipschitz constants (L_attn, L_ffn) of one layer, weights only.

    Lemma 1 globally gives 1/sqrt(eps); every full or perturbed activation is bounded through
    ||n(y)|| < sqrt(C): ||q~|| <= ||W_q diag g|| sqrt(C) + ||b_q||, and likewise.
    """
    rc, rep = math.sqrt(w.width), w.q.shape[0] // w.k.shape[0]
    q_max = w.q * rc + w.bias["q"]
    k_max = (w.k * rc + w.bias["k"]).repeat_interleave(rep)
    v_max = (w.v * rc + w.bias["v"]).repeat_interleave(rep)
    wk, wv = w.k.repeat_interleave(rep), w.v.repeat_interleave(rep)
    per_head = (w.q * k_max + q_max * wk) / math.sqrt(w.head_dim) * v_max + wv
    l_attn = w.o * per_head.pow(2).sum().sqrt().item() / math.sqrt(w.eps)
    u_inf = w.up_row * rc + w.bias["up_inf"]
    a_inf = w.gate_row * rc + w.bias["gate_inf"]
    l_ffn = w.down * (ACT_LIPSCHITZ[w.act] * w.gate * u_inf + a_inf * w.up) / math.sqrt(w.eps)
    return l_attn, l_ffn
