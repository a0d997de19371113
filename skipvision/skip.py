"""Skip-Vision (Zeng, Huang, Ji, Yan; ICCV 2025, arXiv 2503.21817) on top of the plain LLaVA.

What the paper changes in LLaVA-1.5, and nothing else (everything else is vlm.py / llama.py):
- Split: per image, the N_r patches the CLS token attends to most (summed over heads,
  in the vision layer whose output is used) are *retained*, kept in raster order.
- Merge: the other patches' projected features are merged ToMe-style down to N_s
  *skipped* tokens (cosine redundancy; each source joins its most similar destination; plain
  mean). The authors keep destinations in descending-redundancy order (`merge_order`).
- Summary tokens: q1 softmax-pools the retained tokens, q2 the skipped ones, scored by
  one small module, LayerNorm(C) -> Linear(C, 1) (zero-initialised: an exact mean).
- Layout: [text][retained N_r][q1][skipped N_s][q2][text], positions contiguous over all of it.
- Mask: `causal` (as the authors' code) or `consistent` (text after the image cannot see the
  skipped tokens, which makes prefill agree with Skip-KV decoding).
- Skip-FFN: in the chosen layers, skipped tokens take only the attention residual;
  the FFN runs on the other rows only (gather/scatter), forward and backward.
- Skip-KV: after prefill the skipped tokens' keys/values leave the cache (generate.py).

Shapes: B batch, T tokens, I images, N image tokens per image, M = N - N_r merge candidates,
C LLM width, P vision positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import FOREVER, NEVER

PAD, TEXT, RETAINED, SUMMARY, SKIPPED = -1, 0, 1, 2, 3  # Layout.kind values


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

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        for name in ("retained", "skipped"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"SkipConfig.{name} must be an integer >= 0, got {v!r}")
        for name, allowed in [("mask", ("causal", "consistent")), ("kv", ("evict", "keep")),
                              ("merge_order", ("redundancy", "spatial"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"SkipConfig.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.summary and (self.retained == 0 or self.skipped == 0):
            raise ValueError("summary tokens pool the retained and the skipped tokens: they need "
                             "retained >= 1 and skipped >= 1 (or set summary=False)")

    def check(self, n_image_tokens: int, n_layers: int) -> None:
        """Raise if these settings do not fit a model with this geometry."""
        if self.retained + self.skipped > n_image_tokens:
            raise ValueError(f"retained + skipped = {self.retained} + {self.skipped} exceeds the "
                             f"{n_image_tokens} tokens per image of this model; lower them")
        bad = [i for i in self.layers or () if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"Skip-FFN layers {bad} do not exist; the decoder has layers "
                             f"0..{n_layers - 1}")

    def ffn_layers(self, n_layers: int) -> tuple[int, ...]:
        return tuple(range(n_layers)) if self.layers is None else self.layers


PRESETS = {  # (N_r, N_s) settings reported in the paper
    "sv-llava-100-156": SkipConfig(retained=100, skipped=156),
    "sv-llava-256-320": SkipConfig(retained=256, skipped=320),
    "llava-1.5-64-156": SkipConfig(retained=64, skipped=156),
}


@dataclass
class Layout:
    """Where every token of the arranged (B, T) sequence came from, and where features went."""
    kind: torch.Tensor  # (B, T) PAD / TEXT / RETAINED / SUMMARY / SKIPPED
    source: torch.Tensor  # (B, T) column in the original prompt for text tokens, else -1
    image: torch.Tensor  # (B, T) image index for image-derived tokens, else -1
    patch: torch.Tensor  # (B, T) feature index of retained tokens and merge destinations, else -1
    feature_dest: torch.Tensor  # (I, N) arranged column each image feature ended up in (-1 if dropped)

    @property
    def skipped(self) -> torch.Tensor:
        return self.kind == SKIPPED

    def take_text(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Per-token values of the original (B, T0) prompt, moved onto the arranged text tokens."""
        out = values.gather(1, self.source.clamp(min=0))
        return out.masked_fill(self.source < 0, fill)


class SummaryScorer(nn.Module):
    """LayerNorm(C) then Linear(C, 1): a score per token for softmax pooling (paper: summary tokens)."""

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


def cls_attention(layer, h: torch.Tensor) -> torch.Tensor:
    """CLS-query attention probabilities of one CLIP layer, summed over heads: (I, P).

    h (I, P, Cv) is the layer's input; only the CLS row is computed, never the (P, P) map.
    """
    attn = layer.self_attn
    x = layer.layer_norm1(h)
    q = attn.heads(attn.q_proj(x[:, :1]))  # (I, H, 1, D)
    k = attn.heads(attn.k_proj(x))  # (I, H, P, D)
    scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.head_dim ** -0.5  # (I, H, P)
    return scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).sum(1)


def merge(x: torch.Tensor, n_out: int, order: str):
    """ToMe-like merge of candidates (I, M, C) down to (I, n_out, C).

    Returns the merged tokens, the candidate index of each destination (I, n_out), and the
    output slot each candidate joined (I, M).
    """
    I, M, C = x.shape
    r = M - n_out
    if n_out == 0:  # N_s = 0: the candidates are dropped
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


def split_images(model, pixel_values: torch.Tensor, skip: SkipConfig):
    """Pixels (I, 3, S, S) -> retained (I, N_r, C), skipped (I, N_s, C), indices and merge slots."""
    cfg = model.cfg
    last = cfg.feature_layers[-1]
    if last == 0:
        raise ValueError("Skip-Vision ranks patches by CLS attention in the feature layer; "
                         "vision_feature_layer 0 (the embeddings) has no attention")
    hs = model.vision_tower.hidden_states(pixel_values, (last - 1, *cfg.feature_layers))
    feats = model.project(hs[1:])  # (I, N, C)
    attn = cls_attention(model.vision_tower.vision_model.encoder.layers[last - 1], hs[0])
    scores = attn[:, 1:] if cfg.vision_feature_select_strategy == "default" else attn  # (I, N)
    rank = torch.argsort(scores, dim=-1, descending=True, stable=True)
    keep = rank[:, :skip.retained].sort(-1).values  # raster order
    rest = rank[:, skip.retained:].sort(-1).values  # (I, M) merge candidates, raster order
    take = lambda t: feats.gather(1, t[..., None].expand(-1, -1, feats.shape[-1]))
    merged, dst, slot = merge(take(rest), skip.skipped, skip.merge_order)
    return take(keep), merged, keep, rest, rest.gather(1, dst), slot


def prepare(model, input_ids, pixel_values, attention_mask, skip: SkipConfig, position_ids=None):
    """The Skip-Vision counterpart of Llava.prepare: arranged embeddings, positions, mask, rows."""
    from .vlm import LMInput  # vlm imports this module

    cfg, n = model.cfg, model.cfg.image_seq_length
    skip.check(n, cfg.text.num_hidden_layers)
    if position_ids is not None:
        raise ValueError("position_ids cannot be combined with Skip-Vision: positions are "
                         "recomputed over the arranged sequence")
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise ValueError("Skip-Vision needs left padding (padding only before each prompt)")
    is_img = (input_ids == cfg.image_token_id) & attention_mask
    n_img = int(is_img.sum()) // n
    if int(is_img.sum()) != n_img * n or (n_img > 0) != (pixel_values is not None) or (
            pixel_values is not None and pixel_values.shape[0] != n_img):
        raise ValueError(f"the prompt holds {int(is_img.sum())} image tokens but "
                         f"{0 if pixel_values is None else pixel_values.shape[0]} image(s) of "
                         f"{n} tokens each were given; expand each <image> to {n} tokens")
    text = model.embed_text(input_ids)
    if n_img:
        ret, mrg, keep, rest, dst_patch, slot = split_images(model, pixel_values, skip)
        ret, mrg = ret.to(text.dtype), mrg.to(text.dtype)
        if skip.summary:
            q1, q2 = summary_pool(ret, model.summary_scorer), summary_pool(mrg, model.summary_scorer)
    rows, g = [], 0
    for b in range(input_ids.shape[0]):
        cols = attention_mask[b].nonzero().squeeze(1)
        img_cols = is_img[b].nonzero().squeeze(1).view(-1, n)  # (images in row, N)
        if (img_cols[:, -1] - img_cols[:, 0] != n - 1).any():
            raise ValueError(f"row {b}: each image's {n} tokens must be contiguous")
        segs, start = [], int(cols[0]) if len(cols) else input_ids.shape[1]
        for block in img_cols:
            segs.append(_text_segment(text[b], start, int(block[0])))
            segs += _image_segments(skip, ret[g], mrg[g], keep[g], dst_patch[g], g,
                                    q1[g] if skip.summary else None, q2[g] if skip.summary else None)
            start, g = int(block[-1]) + 1, g + 1
        segs.append(_text_segment(text[b], start, input_ids.shape[1]))
        rows.append([torch.cat(parts) for parts in zip(*segs)])
    T = max(r[0].shape[0] for r in rows)
    B, C, dev = len(rows), text.shape[-1], text.device
    embeds = text.new_zeros(B, T, C)
    kind, source, image, patch = (torch.full((B, T), v, dtype=torch.long, device=dev)
                                  for v in (PAD, -1, -1, -1))
    for b, (e, k, s, im, p) in enumerate(rows):
        L = e.shape[0]
        embeds[b, T - L:], kind[b, T - L:], source[b, T - L:] = e, k, s
        image[b, T - L:], patch[b, T - L:] = im, p
    valid = kind != PAD
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    horizon = torch.where(valid, FOREVER, NEVER)
    if skip.mask == "consistent" and n_img:  # skipped tokens are seen only within their image
        sel = image >= 0
        last = torch.full((n_img,), -1, dtype=torch.long, device=dev).scatter_reduce(
            0, image[sel], pos[sel], "amax")
        horizon = torch.where(kind == SKIPPED, last[image.clamp(min=0)], horizon)
    feature_dest = _feature_dest(kind, keep, rest, slot) if n_img else None
    layout = Layout(kind, source, image, patch, feature_dest)
    return LMInput(embeds, pos, horizon, valid, ffn_rows(layout.skipped, skip, cfg), layout)


def _text_segment(text_row, start, end):
    L = max(end - start, 0)
    dev = text_row.device
    return (text_row[start:end], torch.full((L,), TEXT, device=dev),
            torch.arange(start, start + L, device=dev), torch.full((L,), -1, device=dev),
            torch.full((L,), -1, device=dev))


def _image_segments(skip, ret, mrg, keep, dst_patch, g, q1, q2):
    """[retained][q1][skipped][q2] of one image, as (embeds, kind, source, image, patch)."""
    dev = ret.device
    parts = [(ret, RETAINED, keep), (None if q1 is None else q1[None], SUMMARY, None),
             (mrg, SKIPPED, dst_patch), (None if q2 is None else q2[None], SUMMARY, None)]
    out = []
    for e, k, p in parts:
        if e is None:
            continue
        L = e.shape[0]
        out.append((e, torch.full((L,), k, device=dev), torch.full((L,), -1, device=dev),
                    torch.full((L,), g, device=dev),
                    torch.full((L,), -1, device=dev) if p is None else p))
    return out


def _feature_dest(kind, keep, rest, slot):
    """(I, N): arranged column of each image feature (its retained slot or merge destination;
    -1 if it was dropped because N_s = 0). Images are numbered in row-major order."""
    I = keep.shape[0]
    cols = torch.arange(kind.shape[1], device=kind.device).expand_as(kind)
    dest = torch.full((I, keep.shape[1] + rest.shape[1]), -1, dtype=torch.long,
                      device=kind.device)
    dest.scatter_(1, keep, cols[kind == RETAINED].view(I, -1))
    if rest.shape[1] and (kind == SKIPPED).any():
        dest.scatter_(1, rest, cols[kind == SKIPPED].view(I, -1).gather(1, slot))
    return dest


def ffn_rows(skipped: torch.Tensor, skip: SkipConfig, cfg) -> list | None:
    """Per decoder layer: flat indices of the rows that get the FFN, or None (all rows)."""
    if not bool(skipped.any()):
        return None
    rows = (~skipped).flatten().nonzero().squeeze(1)
    layers = set(skip.ffn_layers(cfg.text.num_hidden_layers))
    return [rows if i in layers else None for i in range(cfg.text.num_hidden_layers)]


def skip_ffn(h: torch.Tensor, mlp, norm, rows: torch.Tensor) -> torch.Tensor:
    """Skip-FFN (paper: Skip-FFN): h + mlp(norm(h)) on the flat rows `rows` only, h elsewhere.

    h (B, T, C); rows (R,) indices into B*T. The FFN runs on R rows, forward and backward.
    """
    B, T, C = h.shape
    flat = h.reshape(B * T, C)
    return flat.index_add(0, rows, mlp(norm(flat.index_select(0, rows)))).view(B, T, C)
