"""Pruners inside the language model: after layer K the image tokens they drop are gone from
the hidden states, the later layers' computation and their KV cache (the first K layers keep
every token, as the papers' KV-cache implementations do).

`InLM` is what LlamaModel calls at each layer's input (`prune`, llama.py); the method picks,
per image, the tokens kept. Shapes: B batch, T tokens, H heads, Hkv kv heads, D head dim,
C width, N tokens of one image.
"""
from __future__ import annotations

import math

import torch

from ..kv_cache import NEVER, left_pad
from ..llama import apply_rope, attention_mask, rope_cos_sin
from .select import cosine


def fastv_scores(p, lm, before, x, pos, horizon, images) -> list[torch.Tensor]:
    """FastV (Chen et al., ECCV 2024, arXiv 2403.06764): per image, the `budget` tokens the
    last query attends to most in layer K - 1 (heads averaged). Only that query's row of
    scores is formed: the layers themselves still run SDPA."""
    layer, cfg = lm.layers[p.layer - 1], lm.cfg
    attn, (B, T, _) = layer.self_attn, before.shape
    H, Hkv, D = attn.n_head, attn.n_kv, attn.head_dim
    h = layer.input_layernorm(before)
    cos, sin = rope_cos_sin(pos, cfg, before.dtype)
    q = attn.q_proj(h[:, -1:]).view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
    q = apply_rope(q, cos[:, :, -1:], sin[:, :, -1:])
    k = attn.k_proj(h).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
    k = apply_rope(k, cos, sin).repeat_interleave(H // Hkv, dim=1)  # (B, H, T, D)
    s = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(D)  # (B, H, T)
    seen = attention_mask(pos[:, -1:], pos, horizon)[:, :, 0]  # (B, 1, T)
    s = s.to(torch.promote_types(s.dtype, torch.float32)).masked_fill(~seen, -torch.inf)
    s = s.softmax(-1).mean(1)  # (B, T)
    return [top(s[b, cols], p.budget) for b, cols in zip(images.row.tolist(), images.cols)]


def dart_scores(p, lm, before, x, pos, horizon, images) -> list[torch.Tensor]:
    """DART (Wen et al., arXiv 2502.11494): per image, pivot tokens (the largest key norms in
    layer K, where RoPE leaves norms unchanged), then the tokens least duplicated with them
    (lowest maximum cosine similarity of the hidden states to a pivot)."""
    layer = lm.layers[p.layer]
    k_norm = layer.self_attn.k_proj(layer.input_layernorm(x)).norm(dim=-1)  # (B, T)
    out = []
    for b, cols in zip(images.row.tolist(), images.cols):
        pivots = top(k_norm[b, cols], p.n_pivots)
        dup = cosine(x[b, cols])[:, pivots].max(1).values  # (N,)
        dup[pivots] = torch.inf
        rest = torch.argsort(dup, stable=True)[:p.budget - len(pivots)]
        out.append(torch.cat([pivots, rest]).sort().values)
    return out


def top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest scores (ties: the earlier), ascending."""
    return torch.argsort(scores, descending=True, stable=True)[:n].sort().values


class InLM:
    """Keeps layer K - 1's input (FastV's scores need it) and, at layer K's input, drops every
    image token its method does not keep; rows are re-padded on the left, positions kept."""

    def __init__(self, p, plain, images, method):
        self.p, self.layer, self.images, self.method = p, p.layer, images, method
        self.valid = plain.attention_mask  # (B, T)
        self.before = None

    def __call__(self, lm, i, x, pos, horizon):
        if i == self.layer - 1:
            self.before = x
        if i != self.layer:
            return x, pos, horizon
        keep = self.method(self.p, lm, self.before, x, pos, horizon, self.images)
        kept = self.valid.clone()
        for (b, cols), k in zip(zip(self.images.row.tolist(), self.images.cols), keep):
            kept[b, cols] = False
            kept[b, cols[k]] = True
        idx, valid = left_pad([row.nonzero().squeeze(1) for row in kept], 0)  # (B, T')
        self.before = None
        x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, T', C)
        return x, pos.gather(1, idx) * valid, horizon.gather(1, idx).masked_fill(~valid, NEVER)
