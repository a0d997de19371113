"""Skip-Vision (Zeng, Huang, Ji, Yan; ICCV 2025, arXiv 2503.21817) on top of the plain LLaVA.

What the paper changes, and nothing else (everything else is vlm.py / llama.py):
- Split: per image, N_r tokens are *retained*, kept in raster order. Which ones is a policy
  (`RETAIN`): for LLaVA-1.5 the N_r the CLS token attends to most, summed over heads, in the
  vision layer whose output is used.
- Merge: the other tokens are merged ToMe-style down to N_s *skipped* tokens (cosine
  redundancy; each source joins its most similar destination; plain mean). The authors keep
  destinations in descending-redundancy order (`merge_order`).
- Summary tokens: q1 softmax-pools the retained tokens, q2 the skipped ones, scored by
  one small module, LayerNorm(C) -> Linear(C, 1) (zero-initialised: an exact mean).
- Layout: [text][retained N_r][q1][skipped N_s][q2][text], positions contiguous over all of it.
- Mask: `causal` (as the authors' code) or `consistent` (text after the image cannot see the
  skipped tokens, which makes prefill agree with Skip-KV decoding).
- Skip-FFN: in the chosen layers, skipped tokens take only the attention residual; the FFN
  runs on the other rows only (`ffn_rows`, llama.py).
- Skip-KV: after prefill the skipped tokens' keys/values leave the cache (generate.py).

`arrange` is the seam: the plain model's input (vlm.LMInput) and where its images are
(vlm.ImageTokens) in, the arranged input out: a gather over the plain rows (text, retained)
plus the rows made here (merged, summary). This module imports neither vlm nor llama.

Shapes: B batch, T tokens, I images, N tokens per image, M = N - N_r merge candidates,
E rows made per image, C LLM width.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_fields
from .errors import ConfigError, InputError
from .kv_cache import left_pad, slots

PAD, TEXT, RETAINED, SUMMARY, SKIPPED = -1, 0, 1, 2, 3  # Layout.kind values


def by_cls_attention(cls_attention: torch.Tensor, n: int) -> torch.Tensor:
    """(I, N) CLS attention -> (I, n) indices of the n most attended tokens, raster order
    (ties: the earlier token). Skip-Vision's split for LLaVA-1.5 (paper, Sec. 3)."""
    rank = torch.argsort(cls_attention, dim=-1, descending=True, stable=True)
    return rank[:, :n].sort(-1).values


RETAIN = {"cls_attention": by_cls_attention}  # SkipConfig.retain -> policy


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
            ok = isinstance(self.layers, (list, tuple)) and self.layers and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
            if not ok:
                raise ConfigError(f"SkipConfig.layers must be null (all layers) or a non-empty "
                                  f"list of decoder layer numbers >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        if self.summary and (self.retained == 0 or self.skipped == 0):
            raise ConfigError("summary tokens pool the retained and the skipped tokens: they "
                              "need retained >= 1 and skipped >= 1 (or set summary=False)")

    @classmethod
    def from_dict(cls, d: dict, where: str = "skip_config.json") -> "SkipConfig":
        """From a dict such as skip_config.json's; unknown keys are an error, not ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must hold an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def check(self, n_image_tokens: int, n_layers: int) -> None:
        """Raise if these settings do not fit a model with this geometry."""
        if self.retained + self.skipped > n_image_tokens:
            raise ConfigError(f"retained + skipped = {self.retained} + {self.skipped} exceeds the "
                             f"{n_image_tokens} tokens per image of this model; lower them")
        bad = [i for i in self.layers or () if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"Skip-FFN layers {bad} do not exist; the decoder has layers "
                             f"0..{n_layers - 1}")

    def ffn_layers(self, n_layers: int) -> tuple[int, ...]:
        return tuple(range(n_layers)) if self.layers is None else self.layers

    def replace(self, **changes) -> "SkipConfig":
        return dataclasses.replace(self, **changes)


PRESETS = {  # (N_r, N_s) settings reported in the paper
    "sv-llava-100-156": SkipConfig(retained=100, skipped=156),
    "sv-llava-256-320": SkipConfig(retained=256, skipped=320),
    "llava-1.5-64-156": SkipConfig(retained=64, skipped=156),
}


@dataclass
class Layout:
    """Where every token of the arranged (B, T) sequence came from, and where images went."""
    kind: torch.Tensor  # (B, T) PAD / TEXT / RETAINED / SUMMARY / SKIPPED
    index: torch.Tensor  # (B, T) the plain input's flat (B*T0) row a token copies; -1 if made here
    image: torch.Tensor  # (B, T) image of image-derived tokens, else -1
    dest: torch.Tensor  # (I, N) column each image token ended up in (-1: dropped, N_s = 0)

    @property
    def is_skipped(self) -> torch.Tensor:
        return self.kind == SKIPPED

    def take_text(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Per-token values of the plain (B, T0) prompt, moved onto the arranged text tokens."""
        out = values.flatten()[self.index.clamp(min=0)]
        return out.masked_fill(self.kind != TEXT, fill)


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
    """ToMe-like merge of candidates (I, M, C) down to (I, n_out, C).

    Returns the merged tokens, the candidate index of each destination (I, n_out), and the
    output slot each candidate joined (I, M; -1 when n_out = 0 and all are dropped).
    """
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


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    """(I, K) indices -> (I, n - K) the others, ascending."""
    taken = torch.zeros(keep.shape[0], n, dtype=torch.bool, device=keep.device)
    return (~taken.scatter(1, keep, True)).nonzero()[:, 1].view(keep.shape[0], n - keep.shape[1])


def arrange(plain, images, skip: SkipConfig, scorer: SummaryScorer | None, n_layers: int,
            position_ids=None):
    """The plain input (vlm.LMInput) and its images (vlm.ImageTokens) -> the arranged LMInput.

    Per image: retained rows (by the `skip.retain` policy), merged rows, summary rows, in the
    order [retained][q1][skipped][q2], where the image's tokens were; text stays in place.
    """
    if position_ids is not None:
        raise InputError("position_ids cannot be combined with Skip-Vision: positions are "
                         "recomputed over the arranged sequence")
    B, T, C = plain.embeds.shape
    I, N = images.cols.shape
    skip.check(N, n_layers)
    # per image: the split (a policy), the merge and the summary tokens
    flat = plain.embeds.flatten(0, 1)  # (B*T, C)
    keep = RETAIN[skip.retain](images.cls_attention, skip.retained) if I else images.cols[:, :0]
    rest = complement(keep, N)  # (I, M) merge candidates, raster order
    base = images.row[:, None] * T  # (I, 1): flat row where each image's batch row starts
    keep_rows = base + images.cols.gather(1, keep)  # (I, N_r) flat plain rows
    merged, _, slot = merge(flat[base + images.cols.gather(1, rest)], skip.skipped,
                            skip.merge_order)  # (I, N_s, C)
    made, q = [merged], int(skip.summary)
    if skip.summary:
        q1, q2 = summary_pool(flat[keep_rows], scorer), summary_pool(merged, scorer)  # (I, C)
        made = [q1[:, None], merged, q2[:, None]]
    made = torch.cat(made, 1)  # (I, E, C): rows made here, after the B*T plain rows
    made_rows = B * T + torch.arange(made[..., 0].numel(), device=flat.device)
    made_rows = made_rows.view(made.shape[:2])  # (I, E)
    kinds = [RETAINED] * skip.retained + [SUMMARY] * q + [SKIPPED] * skip.skipped + [SUMMARY] * q
    segment = torch.cat([keep_rows, made_rows], 1)  # (I, N_r + E): an image's rows, in order
    # per batch row: text where it was, each image's segment in place of its tokens
    index, kind, image = _rows(plain.attention_mask, images, segment,
                               torch.tensor(kinds, device=flat.device))
    pad_row = made_rows.numel() + B * T
    index, valid = left_pad(index, pad_row)
    kind, image = left_pad(kind, PAD)[0], left_pad(image, -1)[0]
    table = torch.cat([flat, made.flatten(0, 1), flat.new_zeros(1, C)])  # (pad_row + 1, C)
    embeds = table.index_select(0, index.flatten()).view(*index.shape, C)  # (B, T', C)
    # positions run over the arranged sequence; the consistent mask hides skipped tokens
    pos, horizon = slots(valid)
    if skip.mask == "consistent" and I:  # seen only up to their image's last token
        sel = image >= 0
        last = torch.full((I,), -1, dtype=torch.long, device=pos.device).scatter_reduce(
            0, image[sel], pos[sel], "amax")
        horizon = torch.where(kind == SKIPPED, last[image.clamp(min=0)], horizon)
    joined = made_rows[:, q:q + skip.skipped]  # (I, N_s) -> (I, M): the row each token joined
    joined = joined.gather(1, slot) if skip.skipped else joined
    dest = _dest(index, valid, pad_row + 1, keep, rest, keep_rows, joined)
    layout = Layout(kind, index.masked_fill(index >= B * T, -1), image, dest)
    return dataclasses.replace(plain, embeds=embeds, pos=pos, horizon=horizon,
                               attention_mask=valid, layout=layout,
                               ffn_rows=ffn_rows(layout.is_skipped, skip, n_layers))


def _dest(index, valid, n_rows, keep, rest, keep_rows, joined_rows):
    """(I, N): the arranged column each image token went to: its own if retained, that of the
    merged token it joined otherwise (-1 when N_s = 0 and it was dropped; `joined_rows` is
    then empty)."""
    col = torch.full((n_rows,), -1, device=index.device)  # arranged column of a table row
    col[index[valid]] = valid.nonzero()[:, 1]
    dest = torch.full((keep.shape[0], keep.shape[1] + rest.shape[1]), -1, device=index.device)
    dest.scatter_(1, keep, col[keep_rows])
    if joined_rows.shape[1]:
        dest.scatter_(1, rest, col[joined_rows])
    return dest


def _rows(mask, images, segment, seg_kind):
    """Per batch row: the table rows, kinds and image numbers of the arranged sequence."""
    B, T = mask.shape
    dev = mask.device
    cursor = (~mask).sum(1).tolist()  # first real column of each row (left padding)
    text = lambda b, end: (b * T + torch.arange(cursor[b], end, device=dev))
    out = [[[], [], []] for _ in range(B)]
    for i, (b, start, end) in enumerate(zip(images.row.tolist(), images.cols[:, 0].tolist(),
                                            images.cols[:, -1].tolist())):
        t = text(b, start)
        out[b][0] += [t, segment[i]]
        out[b][1] += [torch.full_like(t, TEXT), seg_kind]
        out[b][2] += [torch.full_like(t, -1), torch.full_like(seg_kind, i)]
        cursor[b] = end + 1
    for b in range(B):
        t = text(b, T)
        out[b][0].append(t)
        out[b][1].append(torch.full_like(t, TEXT))
        out[b][2].append(torch.full_like(t, -1))
    return ([torch.cat(r[j]) for r in out] for j in range(3))


def ffn_rows(is_skipped: torch.Tensor, skip: SkipConfig, n_layers: int) -> list | None:
    """Per decoder layer: flat indices of the rows that get the FFN, or None (all rows)."""
    if not bool(is_skipped.any()):
        return None
    rows = (~is_skipped).flatten().nonzero().squeeze(1)
    layers = set(skip.ffn_layers(n_layers))
    return [rows if i in layers else None for i in range(n_layers)]
