"""FLOPs and bytes of LLaVA and Skip-Vision, counted analytically, per prefill and decode step.

Convention (what every number from this module means):
- A multiply-add counts 2. Only matrix products are counted: every nn.Linear (bias adds not
  counted), the patch-embedding convolution, attention scores Q K^T and weighted sums P V, and
  Skip-Vision's own products (CLS-attention query, keys and scores, the merge's cosine matrix,
  the summary scorer and its pooling). Norms, activations, softmax, RoPE, residual adds,
  gathers/scatters, embedding lookups and sampling are not counted.
- Attention is counted over the whole (T, S) score rectangle: 4 B H T S D per layer, the
  masked-out area (causal, padding, the `consistent` mask) included; with grouped-query
  attention every query head counts. SDPA computes all of it under an explicit mask; under
  `is_causal` (a fresh prefill without padding, llama.is_plain_causal) kernels may skip fully
  masked blocks, so they execute fewer. This is exactly what
  torch.utils.flop_counter.FlopCounterMode counts for these ops (tests/test_flops.py; on CPU
  it needs the math SDPA backend or a formula for the CPU kernel).
- The language model (LM) and the vision side (tower, projector, Skip-Vision's split, merge
  and summary scorer) are reported separately. The paper's FLOPs ratios exclude the vision
  encoder, so `compare`'s headline ratio is the LM's prefill FLOPs.
- Prefill runs as `generate.prefill` does: logits for each row's last position only
  (`logits="all"` is `Llava.forward` and training).
- Decode step t (0 = the first `decode_step` after prefill) attends to S0 + t + 1 cache slots.
  S0 = the padded prompt width T without eviction; after Skip-KV eviction, the widest row's
  kept count (`KVCache.keep` compacts rows and pads them on the right).
- A training step (LM only) is a forward with logits for all rows plus a backward of twice
  its FLOPs (an input- and a weight-gradient product per forward product; all weights and the
  input embeddings need gradients).
- Bytes: the KV cache holds 2 L B Hkv S D elements, padding slots included, as allocated.
  A forward pass reads every LM weight once (layers, final norm, lm_head; not the embedding
  table, of which only the looked-up rows are read); a prefill also writes the cache, a decode
  step reads all of it (activations are not counted).

Shapes: B batch, T prompt width (padded, as arranged), S key slots, L layers, C LM width,
H / Hkv query / key-value heads, D head dim, F FFN width, V vocab, I images, P vision positions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .. import anyres
from ..config import LlavaConfig, TextConfig
from ..errors import InputError
from .. import generate
from ..kv_cache import KVCache
from ..skip import PRESETS, SkipConfig


@dataclass(frozen=True)
class Geometry:
    """Token counts of one prefill, as the language model sees it (plain or arranged)."""
    batch: int  # B
    width: int  # T: padded prompt length
    ffn_tokens: tuple[int, ...]  # per decoder layer: rows of the B*T that get the FFN (Skip-FFN)
    n_skipped: tuple[int, ...]  # per batch row: Skip-Vision skipped tokens (evicted by Skip-KV)

    def cache_slots(self, evict: bool = False) -> int:
        """S0, the cache width after prefill (and after Skip-KV eviction if `evict`)."""
        if not evict:
            return self.width
        return max((self.width - s for s in self.n_skipped), default=0)


def _per_row(v, batch: int) -> tuple:
    return (v,) * batch if isinstance(v, int) else tuple(v)


def _image_rows(images, batch: int) -> tuple:
    """Per batch row, its images: a count (LLaVA-1.5) or a list of (height, width) (LLaVA-NeXT).
    An int is every row's count; a list of (height, width) is one row's."""
    if not isinstance(images, int) and images and isinstance(images[0], tuple):
        return (list(images),)
    return _per_row(images, batch)


def image_counts(cfg: LlavaConfig, images) -> list[tuple[int, int, int]]:
    """(tokens, tiles, row-end newlines) of each image. `images`: how many (LLaVA-1.5, whose
    images are all alike) or the (height, width) of each (LLaVA-NeXT: counts by size)."""
    if isinstance(images, int):
        if cfg.image_grid_pinpoints:
            raise InputError("LLaVA-NeXT's token counts depend on each image's size: give the "
                             "(height, width) of each image")
        return [(cfg.image_seq_length, 1, 0)] * images
    g = cfg.vision.image_size // cfg.vision.patch_size
    out = []
    for h, w in images:
        rows, cols = anyres.tile_grid(cfg, h, w)
        top, bottom, _, _ = anyres.unpad(rows * g, cols * g, h, w)
        out.append((anyres.image_tokens(cfg, h, w), 1 + rows * cols, bottom - top))
    return out


def merged(skip: SkipConfig, n: int, newlines: int) -> tuple[int, int]:
    """(merge candidates M, skipped tokens) of an image of n tokens: what is neither retained
    nor a newline (Skip-Vision drops LLaVA-NeXT's newlines), merged to at most N_s."""
    M = max(0, n - newlines - skip.retained)
    return M, min(skip.skipped, M)


def geometry(cfg: LlavaConfig, text: int | Sequence[int], images=1,
             skip: SkipConfig | None = None) -> Geometry:
    """From explicit counts: `text` tokens and `images` images per row (ints: a batch of 1;
    for LLaVA-NeXT a list of (height, width) per row, see `image_counts`)."""
    text = _per_row(text, 1) if isinstance(text, int) else tuple(text)
    images = _image_rows(images, len(text))
    if len(images) != len(text):
        raise InputError(f"{len(text)} rows of text but {len(images)} rows of images")
    L, lengths, n_skipped = cfg.text.num_hidden_layers, [], []
    for t, row in zip(text, images):
        counts = image_counts(cfg, row)
        if skip is None:
            lengths.append(t + sum(n for n, _, _ in counts))
            n_skipped.append(0)
            continue
        for n, _, _ in counts:
            skip.check(n, L, tiled=cfg.image_grid_pinpoints is not None)
        kept = [merged(skip, n, e)[1] for n, _, e in counts]
        lengths.append(t + sum(skip.retained + k + 2 * skip.summary for k in kept))
        n_skipped.append(sum(kept))
    B, T = len(text), max(lengths, default=0)
    layers = set() if skip is None else set(skip.ffn_layers(L))
    ffn = tuple(B * T - sum(n_skipped) * (i in layers) for i in range(L))
    return Geometry(B, T, ffn, tuple(n_skipped))


def geometry_of(inp, cfg: LlavaConfig) -> Geometry:
    """From what the model built: a vlm.LMInput (`model.prepare(...)`)."""
    B, T = inp.embeds.shape[:2]
    rows = [None] * cfg.text.num_hidden_layers if inp.ffn_rows is None else inp.ffn_rows
    n_skipped = ((0,) * B if inp.layout is None
                 else tuple(inp.layout.is_skipped.sum(1).tolist()))
    return Geometry(B, T, tuple(B * T if r is None else r.numel() for r in rows), n_skipped)


def lm_forward(text: TextConfig, batch: int, tokens: int, keys: int, ffn_tokens: Sequence[int],
               logit_rows: int) -> dict:
    """FLOPs of one LM pass: `tokens` queries per row against `keys` slots, by part."""
    C, F, V, D = text.hidden_size, text.intermediate_size, text.vocab_size, text.head_dim
    H, Hkv, L = text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers
    out = dict(attn_proj=2 * L * batch * tokens * C * D * 2 * (H + Hkv),  # q, o; k, v
               attention=4 * L * batch * H * tokens * keys * D,  # Q K^T and P V
               ffn=2 * 3 * C * F * sum(ffn_tokens),  # SwiGLU: gate, up, down
               lm_head=2 * logit_rows * C * V)
    out["total"] = sum(out.values())
    return out


def prefill(cfg: LlavaConfig, g: Geometry, logits: str = "last") -> dict:
    """LM FLOPs of a prefill; logits for the last position per row ("last") or all ("all")."""
    rows = {"last": g.batch, "all": g.batch * g.width}[logits]
    return lm_forward(cfg.text, g.batch, g.width, g.width, g.ffn_tokens, rows)


def decode_step(cfg: LlavaConfig, g: Geometry, step: int = 0, evict: bool = False) -> dict:
    """LM FLOPs of decode step `step` (0 = first after prefill): one token per row."""
    S = g.cache_slots(evict) + step + 1
    return lm_forward(cfg.text, g.batch, 1, S, (g.batch,) * cfg.text.num_hidden_layers, g.batch)


def training_step(cfg: LlavaConfig, g: Geometry) -> dict:
    """LM FLOPs of one training step: forward (logits on all rows) + backward (2x forward)."""
    fwd = prefill(cfg, g, logits="all")["total"]
    return dict(forward=fwd, backward=2 * fwd, total=3 * fwd)


def vision(cfg: LlavaConfig, images=1, skip: SkipConfig | None = None) -> dict:
    """FLOPs of the vision side for `images` (see `image_counts`): tower, projector,
    Skip-Vision's extras; LLaVA-NeXT's tower and projector run on every tile."""
    v, C = cfg.vision, cfg.text.hidden_size
    Cv, P = v.hidden_size, v.num_positions
    counts = image_counts(cfg, images)
    tiles = sum(k for _, k, _ in counts)
    layers_run = max(cfg.feature_layers)  # vision.VisionTower.hidden_states stops there
    layer = 2 * P * (4 * Cv * Cv + 2 * Cv * v.intermediate_size) + 4 * P * P * Cv
    d_in = Cv * len(cfg.feature_layers)
    out = dict(patch_embedding=2 * tiles * v.num_patches * Cv * v.num_channels * v.patch_size ** 2,
               tower=tiles * layers_run * layer,
               projector=2 * tiles * cfg.image_seq_length * (d_in * C + C * C),
               split=0, merge=0, summary=0)
    if skip is not None:  # CLS query, keys, scores, where the split ranks by them
        out["split"] = tiles * 2 * Cv * (Cv + P * Cv + P) * skip.ranks_by_cls_attention
        for n, _, newlines in counts:
            M, n_s = merged(skip, n, newlines)
            out["merge"] += 2 * M * M * C if n_s else 0  # cosine matrix
            if skip.summary and cfg.summary_scorer:  # scorer Linear(C, 1), then the weighted
                # sum, which torch.einsum runs as a product only over more than one token
                pooled = [m for m in (skip.retained, n_s) if m > 1]
                out["summary"] += 2 * (skip.retained + n_s + sum(pooled)) * C
    out["total"] = sum(out.values())
    return out


def lm_weight_params(text: TextConfig) -> int:
    """Parameters a forward pass reads: decoder layers, final norm, lm_head (not the table)."""
    C, F, D = text.hidden_size, text.intermediate_size, text.head_dim
    H, Hkv = text.num_attention_heads, text.num_key_value_heads
    attn = 2 * C * D * (H + Hkv) + text.attention_bias * (D * (H + 2 * Hkv) + C)
    mlp = 3 * C * F + text.mlp_bias * (2 * F + C)
    return text.num_hidden_layers * (attn + mlp + 2 * C) + C + text.vocab_size * C


def kv_bytes(cfg: LlavaConfig, batch: int, slots: int, dtype=torch.float32) -> int:
    """Bytes of keys and values for `slots` cache slots per row, all layers."""
    t = cfg.text
    per_slot = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim
    return per_slot * batch * slots * _itemsize(dtype)


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def decode_bytes(cfg: LlavaConfig, g: Geometry, step: int = 0, evict: bool = False,
                 dtype=torch.float32) -> int:
    """Bytes read by decode step `step`: every LM weight once plus the whole KV cache."""
    S = g.cache_slots(evict) + step + 1
    return lm_weight_params(cfg.text) * _itemsize(dtype) + kv_bytes(cfg, g.batch, S, dtype)


def compare(cfg: LlavaConfig, text: int | Sequence[int] = 64, images: int | Sequence[int] = 1,
            skip: SkipConfig | str = "sv-llava-100-156", new_tokens: int = 1,
            dtype=torch.float32) -> dict:
    """Plain LLaVA vs Skip-Vision for one prompt geometry, as plain numbers (JSON-ready).

    `prefill` is the LM's prefill FLOPs (the paper's convention, vision excluded); `vision` the
    tower + projector (+ split/merge/summary); `decode` the FLOPs of `new_tokens - 1` decode
    steps (the first token comes from the prefill) and `decode_bytes` what they read;
    `kv_bytes` the cache after prefill (plain; Skip-Vision with kv "keep"; with kv "evict");
    `ratio` = Skip-Vision / plain.
    """
    skip = PRESETS[skip] if isinstance(skip, str) else skip
    gp, gs = geometry(cfg, text, images, None), geometry(cfg, text, images, skip)
    rows = _image_rows(images, gp.batch)
    n_img = (sum(rows) if all(isinstance(r, int) for r in rows) else  # images, or their sizes
             [hw for r in rows for hw in r])
    steps = range(max(new_tokens - 1, 0))
    dec = lambda g, ev: sum(decode_step(cfg, g, t, ev)["total"] for t in steps)
    dec_bytes = lambda g, ev: sum(decode_bytes(cfg, g, t, ev, dtype) for t in steps)
    out = dict(
        tokens=dict(plain=gp.width, skip=gs.width, skipped=sum(gs.n_skipped)),
        prefill=dict(plain=prefill(cfg, gp)["total"], skip=prefill(cfg, gs)["total"]),
        vision=dict(plain=vision(cfg, n_img)["total"], skip=vision(cfg, n_img, skip)["total"]),
        decode=dict(plain=dec(gp, False), keep=dec(gs, False), evict=dec(gs, True)),
        decode_bytes=dict(plain=dec_bytes(gp, False), keep=dec_bytes(gs, False),
                          evict=dec_bytes(gs, True)),
        train=dict(plain=training_step(cfg, gp)["total"], skip=training_step(cfg, gs)["total"]),
        kv_bytes=dict(plain=kv_bytes(cfg, gp.batch, gp.cache_slots(), dtype),
                      keep=kv_bytes(cfg, gs.batch, gs.cache_slots(), dtype),
                      evict=kv_bytes(cfg, gs.batch, gs.cache_slots(True), dtype)))
    for part in ("prefill", "vision", "train"):
        d = out[part]
        d["ratio"] = d["skip"] / d["plain"] if d["plain"] else float("nan")
    return out


@torch.inference_mode()
def counted_prepare(model, *args, **kw):
    """(`model.prepare(*args, **kw)`, its FLOPs: the tower, the projector and the token
    policy's selection, merging and summary tokens), counted as `counted_prefill` counts."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        inp = model.prepare(*args, **kw)
    return inp, count.get_total_flops()


@torch.inference_mode()
def counted_prefill(model, inp, skip=None) -> tuple[int, int]:
    """(FLOPs, KV bytes left for decoding) of `generate`'s prefill on a prepared input, counted
    by FlopCounterMode with SDPA's math backend (every product, any token policy: the pruners
    too, whose geometry this module does not model); Skip-KV's eviction applied."""
    cache = KVCache(model.cfg.text.num_hidden_layers)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        generate.prefill(model, inp, cache)
    if inp.layout is not None and getattr(skip, "kv", "keep") == "evict":
        cache.keep(~inp.layout.is_skipped)
    return count.get_total_flops(), cache.nbytes()
