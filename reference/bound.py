"""Slow oracles of proofs/error_bound.md: Lemma 6 (one decoder layer) token by token, and
Lemma 4 (eviction, one head) as two softmaxes.

Written from the proof with Python loops over batch rows, heads, queries and keys, explicit
per-head weight blocks with the RMSNorm gains folded in, and matrix_norm for every spectral
norm; it shares no code with skipvision/analysis/bound*.py. Float64 throughout.
"""
from __future__ import annotations

import math

import torch

C_ACT = {"silu": 1.1, "quick_gelu": 1.1, "relu": 1.0, "gelu": 1.13, "gelu_pytorch_tanh": 1.13}


def spec(W):
    return torch.linalg.matrix_norm(W.double(), 2).item()


def row(W):
    return W.double().norm(dim=1).max().item()


def n(x, eps):
    return x / torch.sqrt(x.pow(2).mean() + eps)


def lemma1(x, delta, eps):
    C = x.numel()
    r = x.norm().item()
    s = math.sqrt(r * r + C * eps)
    lo = math.sqrt(max(r - delta, 0.0) ** 2 + C * eps)
    return min(2 * math.sqrt(C) * delta / (s + lo), math.sqrt(C) * r / s + math.sqrt(C))


def rope(x, p, theta):
    """Rotate-half RoPE of one head vector x (D,) at position p."""
    D = x.numel()
    out = x.clone()
    for i in range(D // 2):
        a = p * theta ** (-2 * i / D)
        out[i] = x[i] * math.cos(a) - x[i + D // 2] * math.sin(a)
        out[i + D // 2] = x[i + D // 2] * math.cos(a) + x[i] * math.sin(a)
    return out


def layer_bound(layer, cfg, x, pos, mask_ref, mask_new, skip_ref, skip_new, delta):
    """Lemma 6 bound (B, T) for one layer; x (B, T, C) full-run input, masks (B, T, T) bool."""
    B, T, C = x.shape
    H, G, D, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    att, mlp = layer.self_attn, layer.mlp
    g1, g2 = layer.input_layernorm.weight.double(), layer.post_attention_layernorm.weight.double()
    Wq, Wk, Wv = (m.weight.double() * g1 for m in (att.q_proj, att.k_proj, att.v_proj))
    Wo = att.o_proj.weight.double()
    grp = lambda h: h // (H // G)  # noqa: E731
    blk = lambda W, i: W[i * D:(i + 1) * D]  # noqa: E731

    def bias(m, i):  # the bias block of head / group i (zeros without bias)
        return torch.zeros(D, dtype=torch.float64) if m.bias is None else blk(m.bias.double(), i)

    Wg, Wu = mlp.gate_proj.weight.double() * g2, mlp.up_proj.weight.double() * g2
    Wd = mlp.down_proj.weight.double()
    c = C_ACT[cfg.hidden_act]
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        u = [n(x[b, j], eps) for j in range(T)]
        mu = [lemma1(x[b, j], float(delta[b, j]), eps) for j in range(T)]
        q = [[rope(blk(Wq, h) @ u[j] + bias(att.q_proj, h), int(pos[b, j]), cfg.rope.theta)
              for j in range(T)] for h in range(H)]
        k = [[rope(blk(Wk, g) @ u[j] + bias(att.k_proj, g), int(pos[b, j]), cfg.rope.theta)
              for j in range(T)] for g in range(G)]
        v = [[blk(Wv, g) @ u[j] + bias(att.v_proj, g) for j in range(T)] for g in range(G)]
        for i in range(T):
            beta, beta_out, o_ref_all, o_new_all = [], [], [], []
            for h in range(H):
                g = grp(h)
                Woh = Wo[:, h * D:(h + 1) * D]
                s = torch.stack([q[h][i] @ k[g][j] / math.sqrt(D) for j in range(T)])
                a_ref = torch.softmax(s.masked_fill(~mask_ref[b, i], -math.inf), 0)
                a_new = torch.softmax(s.masked_fill(~mask_new[b, i], -math.inf), 0)
                vs = torch.stack(v[g])
                o_ref, o_new = a_ref @ vs, a_new @ vs
                o_ref_all.append(o_ref)
                o_new_all.append(o_new)
                J = [j for j in range(T) if mask_new[b, i, j]]
                wq = spec(blk(Wq, h))
                dq = wq * mu[i]
                qbar = min(q[h][i].norm().item() + dq,
                           wq * math.sqrt(C) + bias(att.q_proj, h).norm().item())
                kmean = sum(k[g][j] for j in J) / len(J)
                bj = torch.tensor([(dq * (k[g][j] - kmean).norm().item()
                                    + qbar * spec(blk(Wk, g)) * mu[j]) / math.sqrt(D) for j in J],
                                  dtype=torch.float64)
                la = torch.log_softmax(s[J], 0)  # full-run weights over the keys i sees
                hi = torch.exp(torch.clamp(la + bj - torch.logsumexp(la - bj, 0), max=0))
                lo = torch.exp(la - bj - torch.logsumexp(la + bj, 0))
                dev = torch.maximum(hi - la.exp(), la.exp() - lo)
                tau = min(2.0, bj.max().item(), dev.sum().item())
                for vecs, w_head, bounded in ((v[g], spec(blk(Wv, g)), True),
                                              ([Woh @ v[g][j] for j in range(T)],
                                               spec(Woh @ blk(Wv, g)), False)):
                    o = sum(a_new[j] * vecs[j] for j in J)
                    mean = sum(vecs[j] for j in J) / len(J)
                    d_o = [(vecs[j] - o).norm().item() for j in J]
                    d_m = [(vecs[j] - mean).norm().item() for j in J]
                    dv = [w_head * mu[j] for j in J]
                    avg = sum(a_new[j].item() * d for j, d in zip(J, dv))
                    value = min(max(dv), avg + tau / 2 * max(dv),
                                sum(hi[t].item() * dv[t] for t in range(len(J))))
                    soft = min(tau * min(max(d_o), max(d_m)),
                               sum(dev[t].item() * d_o[t] for t in range(len(J))),
                               sum(dev[t].item() * d_m[t] for t in range(len(J))))
                    val = min(soft + value, max(d_o) + max(dv))
                    if bounded:
                        vb = bias(att.v_proj, g).norm().item()
                        val = min(val, spec(blk(Wv, g)) * math.sqrt(C) + vb + o.norm().item())
                        beta.append(val)
                    else:
                        beta_out.append(val)
            evict = (Wo @ (torch.cat(o_new_all) - torch.cat(o_ref_all))).norm().item()
            alpha = evict + min(spec(Wo) * math.sqrt(sum(t * t for t in beta)), sum(beta_out))
            eta = float(delta[b, i]) + alpha
            hi = x[b, i] + att.o_proj(torch.cat(o_ref_all))
            nu = lemma1(hi, eta, eps)
            z = layer.post_attention_layernorm(hi)
            G_, U = mlp.gate_proj(z), mlp.up_proj(z)
            A = mlp.act(G_)
            f = mlp.down_proj(A * U)
            core = (Wd @ (A * U)).norm().item()
            gate = c * nu * min(spec(Wg) * U.abs().max().item(), row(Wg) * U.norm().item())
            up = nu * min(spec(Wu) * A.abs().max().item(), row(Wu) * A.norm().item())
            second = c * nu * nu * min(row(Wg) * spec(Wu), spec(Wg) * row(Wu))
            zero = torch.zeros(1, dtype=torch.float64)
            bias_g = zero if mlp.gate_proj.bias is None else mlp.gate_proj.bias.double()
            bias_u = zero if mlp.up_proj.bias is None else mlp.up_proj.bias.double()
            rc = math.sqrt(C)  # ||n(h~)|| < sqrt(C)
            g_inf = min(G_.abs().max().item() + row(Wg) * nu, row(Wg) * rc + bias_g.abs().max())
            g_two = min(G_.norm().item() + spec(Wg) * nu, spec(Wg) * rc + bias_g.norm())
            u_inf = min(U.abs().max().item() + row(Wu) * nu, row(Wu) * rc + bias_u.abs().max())
            u_two = min(U.norm().item() + spec(Wu) * nu, spec(Wu) * rc + bias_u.norm())
            cap = core + spec(Wd) * min(g_inf * u_two, g_two * u_inf)
            d_ffn = min(spec(Wd) * (gate + up + second), cap)
            sr, sn = bool(skip_ref[b, i]), bool(skip_new[b, i])
            # the perturbed row runs the FFN: its change; the runs disagree: the FFN output
            out[b, i] = eta + (d_ffn if not sn else 0) + (f.norm().item() if sr != sn else 0)
    return out


def evicted_attention(scores, v, evicted):
    """Lemma 4, one head: (o_full, o_evicted, alpha, v_bar) for scores (T,), values (T, D).

    alpha is the full softmax's mass on the evicted keys and v_bar their weighted mean; the
    identity o_full - o_evicted = alpha (v_bar - o_evicted) holds exactly.
    """
    a = scores.softmax(-1)
    o_full = a @ v
    o_evicted = scores.masked_fill(evicted, -math.inf).softmax(-1) @ v
    alpha = a[evicted].sum()
    v_bar = (a[evicted] @ v[evicted]) / alpha if alpha > 0 else torch.zeros_like(o_full)
    return o_full, o_evicted, alpha, v_bar
