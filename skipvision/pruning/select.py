"""Pruners at the seam: one image's tokens (N, C), as the LLM would get them, -> the indices
it keeps (n,), ascending, and the rows it makes (m, C); n + m = the budget.

The features are the projected ones (the LLM's input), where DivPrune selects; VisionZip's
paper ranks by the CLS attention of the vision layer whose output is used (ours: the same,
heads summed), but merges its contextual tokens before the projector by the similarity of that
layer's keys. Here they are merged after it, by the cosine similarity of the tokens
themselves, so that every pruner is a policy on the same seam (README: how they compare).
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from ..errors import InputError


def random(p, x: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor]:
    """`budget` tokens uniformly at random, without replacement. The draw is seeded by
    `p.seed` and the image's first token (rounded to bfloat16), so an image keeps the same
    tokens in any batch."""
    key = zlib.crc32(x[0].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    g = torch.Generator().manual_seed(p.seed * 1_000_003 + key)
    keep = torch.randperm(len(x), generator=g)[:p.budget].sort().values
    return keep.to(x.device), x[:0]


def cosine(x: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, N) cosine similarities, in at least float32. Exact ties stay exact, so
    that they go to the earlier token as in the papers' definitions: the matrix is symmetric
    (a mutual nearest pair), and equal tokens (LLaVA-NeXT's newlines) get equal rows."""
    unique, inverse = torch.unique(x, dim=0, return_inverse=True)  # (U, C), (N,)
    xn = F.normalize(unique.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
    s = xn @ xn.T  # (U, U)
    return ((s + s.T) / 2)[inverse][:, inverse]


def divprune(p, x: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor]:
    """DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): the max-min diversity subset,
    built greedily with d = 1 - cosine similarity. First the token farthest from its nearest
    neighbour, then each time the token whose nearest chosen token is farthest (ties: the
    earlier token)."""
    d = 1 - cosine(x)  # (N, N)
    d.fill_diagonal_(float("inf"))
    first = d.min(1).values.argmax()
    chosen = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    chosen[first] = True
    nearest = d[first].clone()  # (N,) distance to the nearest chosen token
    for _ in range(p.budget - 1):
        j = nearest.masked_fill(chosen, -float("inf")).argmax()
        chosen[j] = True
        nearest = torch.minimum(nearest, d[j])
    return chosen.nonzero().squeeze(1), x[:0]


def visionzip(p, x: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): the `budget - contextual`
    dominant tokens the CLS token attends to most, and `contextual` tokens merged from the
    rest: targets evenly spaced over the rest (every len(rest) // contextual-th), each other
    token averaged into its most similar target."""
    if attn is None:
        raise InputError("VisionZip ranks tokens by the CLS attention, which this image has "
                         "none of (vision_feature_layer 0?)")
    n_ctx = p.n_contextual
    rank = torch.argsort(attn, descending=True, stable=True)
    keep = rank[:p.budget - n_ctx].sort().values
    rest = rank[p.budget - n_ctx:].sort().values  # (R,) raster order
    if n_ctx == 0 or len(rest) == 0:
        return keep, x[:0]
    step = max(1, len(rest) // n_ctx)
    is_target = torch.zeros(len(rest), dtype=torch.bool, device=x.device)
    is_target[torch.arange(0, len(rest), step, device=x.device)[:n_ctx]] = True
    targets, others = rest[is_target], rest[~is_target]
    group = cosine(x[torch.cat([others, targets])])[:len(others), len(others):].argmax(1)
    sums = x[targets].index_add(0, group, x[others])  # (m, C)
    counts = torch.ones(len(targets), device=x.device).index_add(
        0, group, torch.ones(len(others), device=x.device))
    return keep, sums / counts[:, None].to(x.dtype)
