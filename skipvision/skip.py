"""Skip-Vision (Zeng, Huang, Ji, Yan; ICCV 2025, arXiv 2503.21817) on top of the plain LLaVA.

What the paper changes, and nothing else (everything else is vlm.py / llama.py):
- Split: per image, N_r tokens are *retained*, kept in raster order; which, a policy (`RETAIN`):
  for LLaVA-1.5 those the CLS token attends to most (heads summed, in the vision layer whose
  output is used); for LLaVA-NeXT (SV-LLaVA-HD) the base image's, the thumbnail.
- Merge: the others (not LLaVA-NeXT's row-end newlines: dropped) are merged ToMe-style to N_s
  *skipped* tokens (cosine redundancy; each source joins its most similar destination; plain
  mean), in descending-redundancy order as the authors' code, or raster (`merge_order`).
- Summary tokens: q1 softmax-pools the retained tokens, q2 the skipped ones, scored by one
  small module, LayerNorm(C) -> Linear(C, 1) (zero-initialised: an exact mean).
- Layout: [text][retained N_r][q1][skipped N_s][q2][text], positions contiguous over all of it.
- Mask: `causal` (as the authors' code) or `consistent` (text after the image cannot see the
  skipped tokens, which makes prefill agree with Skip-KV decoding).
- Skip-FFN: in the chosen layers, skipped tokens take only the attention residual; the FFN
  runs on the other rows only (`ffn_rows`, llama.py).
- Skip-KV: after prefill the skipped tokens' keys/values leave the cache (generate.py).

`arrange` is Skip-Vision's side of the seam (seam.py): the plain model's input (vlm.LMInput)
and where its images are (vlm.ImageTokens) in, the arranged input out: a gather over the
plain rows (text, retained) plus the rows made here (merged, summary). This module imports
neither vlm nor llama.
Shapes: B batch, T tokens, I images (G of one size), N tokens per image, M merge
candidates, E rows made per image, C LLM width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, check_fields
from .seam import (PAD, RETAINED, SKIPPED, SUMMARY, TEXT, Layout, assemble,  # noqa: F401
                   complement)


def by_cls_attention(images, idx: list[int], n: int) -> torch.Tensor:
    """The n tokens of each image idx[j] the CLS token attends to most, raster order (ties:
    the earlier token); Skip-Vision's split for LLaVA-1.5 (paper, Sec. 3). (G, n)"""
    scores = torch.stack([images.cls_attention[i] for i in idx])  # (G, N)
    rank = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return rank[:, :n].sort(-1).values


def thumbnail(images, idx: list[int], n: int) -> torch.Tensor:
    """LLaVA-NeXT's base image, whose tokens come first (SV-LLaVA-HD retains it). (G, n)"""
    base = -1 if images.part is None else int((images.part[idx[0]] == 0).sum())
    if n != base:
        raise ConfigError(f"retain='thumbnail' keeps the tokens of LLaVA-NeXT's base image: "
                          f"set retained to their number ({base}), not {n}")
    return torch.arange(n, device=images.row.device).expand(len(idx), n)


RETAIN = {"cls_attention": by_cls_attention, "thumbnail": thumbnail}  # SkipConfig.retain


@dataclass(frozen=True)
class SkipConfig:
    """Skip-Vision settings; `skip=None` everywhere means the plain LLaVA."""
    retained: int = 100  # N_r, paper's SV-LLaVA setting 100/156
    skipped: int = 156  # N_s
    summary: bool = True  # the two summary tokens q1, q2
    mask: str = "causal"  # or "consistent"
    kv: str = "evict"  # Skip-KV after prefill, or "keep"
    layers: tuple[int, ...] | None = None  # decoder layers with Skip-FFN; None = all
    merge_order: str = "redundancy"  # order of the merged tokens, or "spatial" (raster)
    retain: str = "cls_attention"  # which tokens are retained: a key of RETAIN

    def __post_init__(self):
        check_fields(self, "SkipConfig.", dict(
            retained=("int", (0, 1 << 20)), skipped=("int", (0, 1 << 20)), summary=("bool", ()),
            mask=("str", ("causal", "consistent")), kv=("str", ("evict", "keep")),
            merge_order=("str", ("redundancy", "spatial")), retain=("str", tuple(RETAIN))))
        if self.layers is not None:
            if not (isinstance(self.layers, (list, tuple)) and self.layers and all(
                    type(i) is int and i >= 0 for i in self.layers)):
                raise ConfigError(f"SkipConfig.layers must be null (all layers) or a non-empty "
                                  f"list of decoder layer numbers >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        if self.summary and (self.retained == 0 or self.skipped == 0):
            raise ConfigError("summary tokens pool the retained and the skipped tokens: they "
                              "need retained >= 1 and skipped >= 1 (or set summary=False)")

    def check(self, n_image_tokens: int, n_layers: int, tiled: bool = False) -> None:
        """Raise if these settings do not fit a model with this geometry. An image of LLaVA-1.5
        must hold N_r + N_s tokens; a tiled (LLaVA-NeXT) image N_r, the rest merged to at most
        N_s."""
        need = self.retained + (int(self.summary) if tiled else self.skipped)
        if need > n_image_tokens:
            raise ConfigError(f"retained{' + summary' if tiled else ' + skipped'} = {need} "
                              f"exceeds the {n_image_tokens} tokens of an image; lower it")
        bad = [i for i in self.layers or () if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"Skip-FFN layers {bad} do not exist; the decoder has layers "
                              f"0..{n_layers - 1}")

    @property
    def ranks_by_cls_attention(self) -> bool:  # whether the tower must report it
        return self.retain == "cls_attention"

    def ffn_layers(self, n_layers: int) -> tuple[int, ...]:
        return tuple(range(n_layers)) if self.layers is None else self.layers

    def arrange(self, plain, images, scorer, n_layers: int, position_ids=None):
        """The token-policy protocol the model calls (skipvision/pruning implements it too)."""
        return arrange(plain, images, self, scorer, n_layers, position_ids)


PRESETS = {  # (N_r, N_s) settings reported in the paper
    "sv-llava-100-156": SkipConfig(retained=100, skipped=156),
    "sv-llava-256-320": SkipConfig(retained=256, skipped=320),
    "llava-1.5-64-156": SkipConfig(retained=64, skipped=156),
    "sv-llava-hd-576-576": SkipConfig(retained=576, skipped=576, retain="thumbnail"),  # HD
}


class SummaryScorer(nn.Module):
    """LayerNorm(C) then Linear(C, 1): a score per token for softmax pooling (paper: summary
    tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.norm(x)).squeeze(-1)


def summary_pool(x: torch.Tensor, scorer: SummaryScorer | None) -> torch.Tensor:
    """(I, M, C) -> (I, C): softmax(score)-weighted sum; the plain mean without a scorer."""
    if scorer is None:
        return x.mean(1)
    s = scorer(x)
    w = s.to(torch.promote_types(s.dtype, torch.float32)).softmax(-1).to(x.dtype)  # (I, M)
    return torch.einsum("im,imc->ic", w, x)


def merge(x: torch.Tensor, n_out: int, order: str):
    """ToMe-like merge of candidates (I, M, C) down to (I, n_out, C). Returns the merged
    tokens, the candidate index of each destination (I, n_out), and the output slot each
    candidate joined (I, M; -1 when n_out = 0 and all are dropped)."""
    I, M, C = x.shape
    r = M - n_out
    if n_out == 0:
        return x[:, :0], torch.zeros(I, 0, dtype=torch.long, device=x.device), torch.full(
            (I, M), -1, dtype=torch.long, device=x.device)
    xn = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)  # ranks in fp32+
    eye = torch.eye(M, dtype=torch.bool, device=x.device)
    sim = (xn @ xn.transpose(1, 2)).masked_fill(eye, 0)  # (I, M, M) cosine, zero diagonal
    rank = torch.argsort(sim.sum(-1), dim=-1, descending=True, stable=True)  # by redundancy
    src, dst = rank[:, :r], rank[:, r:]
    if order == "spatial":
        dst = dst.sort(-1).values
    sim_sd = sim.gather(1, src[..., None].expand(-1, -1, M))  # (I, r, M)
    assign = sim_sd.gather(2, dst[:, None, :].expand(-1, r, -1)).argmax(-1)  # (I, r)
    idx = lambda t: t[..., None].expand(-1, -1, C)
    sums = x.gather(1, idx(dst)).scatter_add(1, idx(assign), x.gather(1, idx(src)))
    counts = torch.ones(I, n_out, dtype=x.dtype, device=x.device).scatter_add(
        1, assign, torch.ones(I, r, dtype=x.dtype, device=x.device))
    slot = torch.empty(I, M, dtype=torch.long, device=x.device)
    slot.scatter_(1, dst, torch.arange(n_out, device=x.device).expand(I, -1))
    slot.scatter_(1, src, assign)
    return sums / counts[..., None], dst, slot


def arrange(plain, images, skip: SkipConfig, scorer: SummaryScorer | None, n_layers: int,
            position_ids=None):
    """The plain input (vlm.LMInput) and its images (vlm.ImageTokens) -> the arranged LMInput.
    Per image: retained rows (by the `skip.retain` policy), merged rows, summary rows, in the
    order [retained][q1][skipped][q2], where the image's tokens were; text stays in place."""
    flat = plain.embeds.flatten(0, 1)  # (B*T, C)
    made, segments, kinds, dests = _images(flat, plain.embeds.shape[1], images, skip, scorer,
                                           n_layers)
    inp, col = assemble(plain, images, made, segments, kinds, position_ids)
    layout = inp.layout
    if skip.mask == "consistent" and segments:  # skipped: seen only up to their image's end
        pos, image = inp.pos, layout.image
        sel, last = image >= 0, pos.new_full((len(segments),), -1)
        last = last.scatter_reduce(0, image[sel], pos[sel], "amax")
        inp.horizon = torch.where(layout.kind == SKIPPED, last[image.clamp(min=0)], inp.horizon)
    layout.dest = [_dest(col, *d) for d in dests]
    inp.ffn_rows = ffn_rows(layout.is_skipped, skip, n_layers)
    return inp


def _images(flat, T, images, skip, scorer, n_layers):
    """Per image: split (a policy), merge and summary tokens, batched over images with the
    same number of tokens. Returns the rows made (E, C), and per image the table rows of its
    segment (plain rows first, then B*T + made rows), their kinds, and where its tokens went."""
    I, q, made = len(images.cols), int(skip.summary), []
    segments, kinds, dests = [None] * I, [None] * I, [None] * I
    # LLaVA-NeXT's row-end newlines are neither retained nor merged: they are dropped
    ends = [(p == 2).nonzero()[:, 0] for p in images.part or [images.row[:0]] * I]
    keys = [(len(c), len(e)) for c, e in zip(images.cols, ends)]
    for N, n_end in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == (N, n_end)]
        skip.check(N, n_layers, tiled=images.part is not None)
        cols = torch.stack([images.cols[i] for i in idx])  # (G, N)
        keep = RETAIN[skip.retain](images, idx, skip.retained)  # (G, N_r)
        gone = torch.cat([keep, torch.stack([ends[i] for i in idx])], 1)
        rest = complement(gone, N)  # (G, M) merge candidates, raster order
        base = images.row[idx][:, None] * T  # (G, 1): flat row where each batch row starts
        keep_rows = base + cols.gather(1, keep)  # (G, N_r) flat plain rows
        n_s = min(skip.skipped, rest.shape[1])
        if skip.summary and not n_s:
            raise ConfigError("summary tokens pool skipped tokens: an image has none to skip")
        merged, _, slot = merge(flat[base + cols.gather(1, rest)], n_s, skip.merge_order)
        group = [merged]  # (G, N_s, C)
        if skip.summary:
            q1, q2 = summary_pool(flat[keep_rows], scorer), summary_pool(merged, scorer)
            group = [q1[:, None], merged, q2[:, None]]
        group = torch.cat(group, 1)  # (G, E, C)
        rows = len(flat) + sum(map(len, made)) + torch.arange(  # (G, E) made rows, in the table
            group[..., 0].numel(), device=flat.device).view(group.shape[:2])
        made.append(group.flatten(0, 1))
        kind = torch.tensor([RETAINED] * skip.retained + [SUMMARY] * q + [SKIPPED] * n_s
                            + [SUMMARY] * q, device=flat.device)
        joined = rows[:, q:q + n_s]  # (G, N_s) -> (G, M): the row each candidate joined
        joined = joined.gather(1, slot) if n_s else joined
        for j, i in enumerate(idx):
            segments[i], kinds[i] = torch.cat([keep_rows[j], rows[j]]), kind
            dests[i] = (N, keep[j], rest[j], keep_rows[j], joined[j])
    return torch.cat([flat[:0], *made]), segments, kinds, dests


def _dest(col, n, keep, rest, keep_rows, joined_rows):
    """(N,): the arranged column (`col` of its table row) each of an image's tokens went to:
    its own if retained, its merged token's otherwise, -1 if dropped (N_s = 0)."""
    dest = torch.full((n,), -1, dtype=torch.long, device=col.device)
    dest[keep] = col[keep_rows]
    if len(joined_rows):
        dest[rest] = col[joined_rows]
    return dest


def ffn_rows(is_skipped: torch.Tensor, skip: SkipConfig, n_layers: int) -> list | None:
    """Per decoder layer: flat indices of the rows that get the FFN, or None (all rows)."""
    if not bool(is_skipped.any()):
        return None
    rows = (~is_skipped).flatten().nonzero().squeeze(1)
    layers = set(skip.ffn_layers(n_layers))
    return [rows if i in layers else None for i in range(n_layers)]
