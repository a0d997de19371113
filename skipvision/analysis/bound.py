"""The Skip-FFN / Skip-KV error bound of proofs/error_bound.md, computed on one input.

Two runs of the same language model on the same embeddings: the full (reference) run and a
perturbed run that skips the FFN on some rows (Skip-FFN) and/or hides some keys from the
decode tokens (Skip-KV). Per layer and per token we return

- the measured error ||x_l - x~_l|| (both runs through the model's own forward),
- the end-to-end bound (Theorems 1 and 2: Lemma 6 iterated from zero error),
- the one-step bound (Corollary 2: Lemma 6 applied to the measured error of the layer before),
- the a-priori bound (Corollary 1: weights-only Lipschitz constants, max over tokens),

and the same for the final normed hidden states and the logits (Lemma 7). The full run's
activation norms come from `trace_layer`, which recomputes each layer from the model's own
submodules with an explicit softmax. The lemmas live in bound_lemmas.py.

Shapes: L layers, B batch, T tokens, H heads, G kv heads, D head dim, C width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bound_lemmas import (AttnStats, FfnStats, LayerStats, apriori_constants, head_bound,
                           head_norms, layer_step, weight_norms)
from ..errors import InputError
from ..kv_cache import FOREVER
from ..llama import apply_rope, attention_mask, rope_cos_sin


def _cdist(a, b):
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _float64(t):
    return t.detach().double().cpu()


def attention_stats(att, u, cos, sin, mask_ref, mask_new):
    """Full-run attention on u = RMSNorm(x) (B, T, C), explicit softmax.

    Returns the attention output under `mask_ref` and the AttnStats Lemma 5 reads, taken
    under `mask_new`, the perturbed run's visibility (the hybrid run).
    """
    B, T, C = u.shape
    H, G, D = att.n_head, att.n_kv, att.head_dim
    q = att.q_proj(u).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = att.k_proj(u).view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
    v = att.v_proj(u).view(B, T, G, D).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)  # (B, H, T, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    a_ref = scores.masked_fill(~mask_ref, -math.inf).log_softmax(-1).exp()
    log_new = scores.masked_fill(~mask_new, -math.inf).log_softmax(-1)
    a_new = log_new.exp()
    o_ref, o_new = a_ref @ v, a_new @ v  # (B, H, T, D)
    flat = lambda o: o.transpose(1, 2).reshape(B, T, H * D)  # noqa: E731
    mf = mask_new.to(u.dtype)  # (B, 1, T, T)
    mean = lambda t: mf @ t / mf.sum(-1, keepdim=True)  # noqa: E731  mean of visible keys
    wo = att.o_proj.weight.view(C, H, D).transpose(0, 1)  # (H, C, D): W_o^h
    ov, oo = v @ wo.transpose(1, 2), o_new @ wo.transpose(1, 2)  # (B, H, T, C)
    dist = lambda c, t: _float64(torch.where(mask_new, _cdist(c, t), 0))  # noqa: E731
    f = _float64
    stats = AttnStats(
        q_norm=f(q.norm(dim=-1)), k_dist=dist(mean(k), k), log_attn=f(log_new), attn=f(a_new),
        v_dist_o=dist(o_new, v), v_dist_m=dist(mean(v), v), o_norm=f(o_new.norm(dim=-1)),
        ov_dist_o=dist(oo, ov), ov_dist_m=dist(mean(ov), ov), mask=mask_new.cpu(),
        evict=f(F.linear(flat(o_new - o_ref), att.o_proj.weight).norm(dim=-1)))
    return att.o_proj(flat(o_ref)), stats


def ffn_stats(norm, mlp, h):
    """Full-run FFN sub-block on h (B, T, C): its output FFN(norm(h)) and the FfnStats."""
    z = norm(h)
    gate, up = mlp.gate_proj(z), mlp.up_proj(z)
    act = mlp.act(gate)
    out = mlp.down_proj(act * up)
    f, n = _float64, out.norm(dim=-1)
    core = F.linear(act * up, mlp.down_proj.weight).norm(dim=-1)
    return out, FfnStats(g_inf=f(gate.abs().amax(-1)), g_two=f(gate.norm(dim=-1)),
                         u_inf=f(up.abs().amax(-1)),
                         u_two=f(up.norm(dim=-1)), a_inf=f(act.abs().amax(-1)),
                         a_two=f(act.norm(dim=-1)), dropped=f(n), core=f(core),
                         ratio=f(n / h.norm(dim=-1)))


def trace_layer(layer, x, cos, sin, mask_ref, mask_new, skip_ref):
    """One decoder layer on the full-run input x (B, T, C): its output under the reference
    mask and skip set (B, T), and the LayerStats of Lemma 6."""
    y, a = attention_stats(layer.self_attn, layer.input_layernorm(x), cos, sin, mask_ref,
                           mask_new)
    h = x + y
    f, fs = ffn_stats(layer.post_attention_layernorm, layer.mlp, h)
    out = torch.where(skip_ref[..., None], h, h + f)
    return out, LayerStats(_float64(x.norm(dim=-1)), _float64(h.norm(dim=-1)), a, fs)


def _parts(model):
    """(LlamaModel, lm_head or None) of a Llava, LlamaForCausalLM or LlamaModel."""
    lm = getattr(model, "language_model", model)
    return (lm.model, lm.lm_head) if hasattr(lm, "lm_head") else (lm, None)


def skip_masks(skip, n_layers: int, B: int, T: int) -> list[torch.Tensor]:
    """Per layer (B, T) bool CPU masks of the rows that skip the FFN.

    `skip`: None (nothing skipped); one (B, T) bool mask for every layer (such as
    `Layout.is_skipped`); or one entry per layer, each None, a (B, T) bool mask, or
    LlamaModel's `ffn_rows` entry (the flat rows that GET the FFN).
    """
    skip = [skip] * n_layers if skip is None or isinstance(skip, torch.Tensor) else skip
    if len(skip) != n_layers:
        raise InputError(f"skip has {len(skip)} entries for a model with {n_layers} layers")
    out = []
    for i, m in enumerate(skip):
        if m is None:
            m = torch.zeros(B, T, dtype=torch.bool)
        elif m.dtype != torch.bool:  # ffn_rows: flat indices of the rows that keep the FFN
            m = torch.ones(B * T, dtype=torch.bool).index_fill(0, m.cpu(), False).view(B, T)
        if m.shape != (B, T):
            raise InputError(f"skip mask of layer {i} has shape {tuple(m.shape)}, need {(B, T)}")
        out.append(m.cpu())
    return out


def ffn_rows(masks: list[torch.Tensor], device=None):
    """LlamaModel's `ffn_rows` for per-layer skip masks (None where a layer skips nothing)."""
    rows = [None if not m.any() else (~m).flatten().nonzero().squeeze(1).to(device)
            for m in masks]
    return None if all(r is None for r in rows) else rows


def _run(lm, x, pos, horizon, rows):
    """The model's own forward; returns every layer's input/output and the final hidden."""
    outs = [x]
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out))
             for layer in lm.layers]
    try:
        final = lm(x, pos, horizon, None, rows)
    finally:
        for h in hooks:
            h.remove()
    return outs, final


@dataclass
class BoundReport:
    """Errors and bounds per layer l = 0 (embeddings) .. L (before the final norm)."""
    measured: torch.Tensor  # (L+1, B, T) ||x_l - x~_l||
    end_to_end: torch.Tensor  # (L+1, B, T) Theorem 1 / 2
    one_step: torch.Tensor  # (L+1, B, T) Corollary 2 (row 0: zero)
    apriori: torch.Tensor  # (L+1,) Corollary 1, max over all tokens
    final: dict  # 'hidden', 'logits_l2', 'logits_inf' -> (measured, end_to_end, one_step,
    #             apriori): Lemma 7 on the final normed hidden states and the logits
    ffn_ratio: torch.Tensor  # (L, B, T) ||FFN out|| / ||FFN input||, full run (paper Fig. 1)
    dropped: torch.Tensor  # (L, B, T) ||FFN out||, full run
    valid: torch.Tensor  # (B, T) bool, non-padding tokens
    sizes: list  # per row of rows(): (B, T) |a| + |b| of the two compared values (rounding)

    def rows(self):
        """(name, measured, end_to_end, one_step, apriori) per layer, then the final rows."""
        out = [(str(i), self.measured[i], self.end_to_end[i], self.one_step[i], self.apriori[i])
               for i in range(self.measured.shape[0])]
        return out + [(name, *vals) for name, vals in self.final.items()]

    def ratio(self, measured, bound) -> float:
        """max over valid tokens of measured / bound (a token with 0 error counts 0)."""
        m, b = measured[self.valid], bound[self.valid]
        return torch.where(m > 0, m / b, 0).max().item() if m.numel() else 0.0

    def violations(self, rtol: float = 1e-9, atol: float = 1e-12) -> list[str]:
        """Rows where a valid token's measured error exceeds a bound by more than float64
        rounding, bound * (1 + rtol) + atol * (|a| + |b|) with a and b the compared values, or
        where a measured error is NaN or inf or a bound NaN (never a pass; an infinite bound
        holds, vacuously)."""
        bad = []
        for (name, m, e, o, a), size in zip(self.rows(), self.sizes):
            v = self.valid
            for what, b in (("end-to-end", e[v]), ("one-step", o[v]), ("a-priori", float(a))):
                b = torch.as_tensor(b, dtype=m.dtype)
                if not bool(torch.isfinite(m[v]).all()) or bool(b.isnan().any()):
                    bad.append(f"row {name}: the measured error or the {what} bound is NaN "
                               "or inf")
                    continue
                over = m[v] - b * (1 + rtol) - atol * size[v]
                if bool((over > 0).any()):
                    bad.append(f"row {name}: measured exceeds the {what} bound by "
                               f"{over.max().item():.3e}")
        return bad

    def table(self) -> list[dict]:
        """Max over valid tokens per row, and the worst per-token measured/bound ratios."""
        v = self.valid
        return [dict(layer=name, measured=m[v].max().item(), one_step=o[v].max().item(),
                     end_to_end=e[v].max().item(), apriori=float(a),
                     ratio_one_step=self.ratio(m, o), ratio_end_to_end=self.ratio(m, e))
                for name, m, e, o, a in self.rows()]

    def format(self) -> str:
        lines = [f"{'layer':>10} {'measured':>10} {'one-step':>10} {'end-to-end':>10} "
                 f"{'a-priori':>10} {'m/1-step':>9} {'m/e2e':>9}"]
        for r in self.table():
            lines.append(f"{r['layer']:>10} {r['measured']:10.3e} {r['one_step']:10.3e} "
                         f"{r['end_to_end']:10.3e} {r['apriori']:10.3e} "
                         f"{r['ratio_one_step']:9.2e} {r['ratio_end_to_end']:9.2e}")
        return "\n".join(lines)


@torch.no_grad()
def model_norms(model):
    """(per-layer WeightNorms, HeadNorms): the input-independent part of the bound."""
    lm, head = _parts(model)
    return [weight_norms(layer, lm.cfg) for layer in lm.layers], head_norms(lm, head, lm.cfg)


@torch.no_grad()
def compare(model, embeds, pos, horizon=None, horizon_new=None, skip_ref=None,
            skip_new=None, norms=None) -> BoundReport:
    """Full run (horizon, skip_ref) vs perturbed run (horizon_new, skip_new), same weights and
    embeddings (B, T, C) at positions (B, T): Theorems 1 and 2 and their corollaries.

    `norms`: `model_norms(model)`, to reuse across inputs. Float64 only: the model's error
    is then the method's own, and `violations` allows float64 rounding, no more.
    """
    lm, head = _parts(model)
    if (dtypes := {p.dtype for p in model.parameters()} | {embeds.dtype}) != {torch.float64}:
        raise InputError(f"the bound is checked in float64 only (use model.double()); got "
                         f"{sorted(map(str, dtypes))}: in float32 rounding alone is ~1e-7")
    weights, hw = model_norms(model) if norms is None else norms
    (cfg, L), (B, T, _) = (lm.cfg, len(lm.layers)), embeds.shape
    if pos.shape != (B, T):
        raise InputError(f"pos has shape {tuple(pos.shape)}, embeds {tuple(embeds.shape)}")
    horizon = torch.full_like(pos, FOREVER) if horizon is None else horizon
    horizon_new = horizon if horizon_new is None else horizon_new
    sr, sn = skip_masks(skip_ref, L, B, T), skip_masks(skip_new, L, B, T)
    dev = embeds.device
    ref, ref_final = _run(lm, embeds, pos, horizon, ffn_rows(sr, dev))
    new, new_final = _run(lm, embeds, pos, horizon_new, ffn_rows(sn, dev))
    measured = torch.stack([(a - b).norm(dim=-1) for a, b in zip(ref, new)]).double().cpu()
    sizes = [(a.norm(dim=-1) + b.norm(dim=-1)).double().cpu() for a, b in zip(ref, new)]
    mask_ref = attention_mask(pos, pos, horizon)
    mask_new = attention_mask(pos, pos, horizon_new)
    cos, sin = rope_cos_sin(pos, cfg, embeds.dtype)
    zero = torch.zeros(B, T, dtype=torch.float64)
    e2e, one, apri, ratio, dropped = [zero], [zero], [0.0], [], []
    for i, (layer, w) in enumerate(zip(lm.layers, weights)):
        _, s = trace_layer(layer, ref[i], cos, sin, mask_ref, mask_new, sr[i].to(dev))
        e2e.append(layer_step(e2e[-1], w, s, sr[i], sn[i])[0])
        one.append(layer_step(measured[i], w, s, sr[i], sn[i])[0])
        l_attn, l_ffn = apriori_constants(w)
        diff = sr[i] != sn[i]
        eps_l = s.ffn.dropped[diff].max().item() if diff.any() else 0.0
        evict = s.attn.evict.max().item()
        apri.append((1 + l_ffn) * ((1 + l_attn) * apri[-1] + evict) + eps_l)
        ratio.append(s.ffn.ratio)
        dropped.append(s.ffn.dropped)
    xn = ref[-1].norm(dim=-1).double().cpu()
    got = [(ref_final - new_final).norm(dim=-1)]
    sizes.append(ref_final.norm(dim=-1) + new_final.norm(dim=-1))
    if head is not None:
        z, z2 = head(ref_final).double(), head(new_final).double()
        got += [(z - z2).norm(dim=-1), (z - z2).abs().amax(-1)]
        sizes += [z.norm(dim=-1) + z2.norm(dim=-1), z.abs().amax(-1) + z2.abs().amax(-1)]
    b_e2e, b_one = head_bound(e2e[-1], xn, hw), head_bound(measured[-1], xn, hw)
    a_mu = apri[-1] / math.sqrt(hw.eps)
    a_final = (hw.gain * a_mu, hw.head * a_mu, hw.head_row * a_mu)
    final = {n: (m.double().cpu(), b_e2e[j], b_one[j], a_final[j])
             for j, (n, m) in enumerate(zip(("hidden", "logits_l2", "logits_inf"), got))}
    return BoundReport(measured, torch.stack(e2e), torch.stack(one),
                       torch.tensor(apri, dtype=torch.float64), final,
                       torch.stack(ratio), torch.stack(dropped), (horizon >= pos).cpu(),
                       [t.double().cpu() for t in sizes])


def skip_ffn_bound(model, embeds, pos, skipped, horizon=None, norms=None) -> BoundReport:
    """Theorem 1: the full model vs Skip-FFN, where the rows in `skipped` get only
    x <- x + attn(norm(x)) in the chosen layers (see `skip_masks` for the accepted forms)."""
    return compare(model, embeds, pos, horizon, horizon, None, skipped, norms)


def skip_kv_bound(model, embeds, pos, evicted, n_decode: int, horizon=None, skipped=None,
                  norms=None) -> BoundReport:
    """Theorem 2: decoding the last `n_decode` tokens with the full cache vs with the prefill
    tokens in `evicted` (B, T) removed from it (Skip-KV); `skipped`: Skip-FFN rows of both
    runs. Eviction is written as a mask: an evicted key's horizon becomes the last prefill
    position, so no decode token sees it, exactly as after KVCache.keep."""
    B, T = pos.shape
    P = T - n_decode
    if not 0 < P < T:
        raise InputError(f"n_decode must be in 1..{T - 1} for {T} tokens, got {n_decode}")
    if evicted.shape != (B, T) or evicted[:, P:].any():
        raise InputError("evicted must be a (B, T) bool mask over the prefill tokens only")
    last = pos[:, :P].amax(1, keepdim=True)
    if (pos[:, P:] <= last).any():
        raise InputError("decode positions must come after every prefill position")
    horizon = torch.full_like(pos, FOREVER) if horizon is None else horizon
    horizon_new = torch.where(evicted, torch.minimum(horizon, last), horizon)
    return compare(model, embeds, pos, horizon, horizon_new, skipped, skipped, norms)
