"""Memory per GPU of one training step, counted analytically: `examples/train.py --plan`.

Convention (what every number from this module means), in bytes per GPU:
- Weights: every parameter in the weights' dtype `w` (float32 master weights by default).
  Sharded over N GPUs (FSDP2, training/parallel.py), a GPU holds its padded 1/N of each
  (`ceil(rows / N)` rows), plus `gathered`: the compute-dtype copies FSDP2 holds while a step
  runs (the root unit whole and two other units at once: the one computing and the one
  prefetched). Unsharded (DDP) with bf16 autocast, `gathered` is autocast's bf16 copy of every
  weight the forward uses.
- Gradients: every trained parameter, dtype `w`; sharded 1/N, plus (in `gathered`) one unit's
  unsharded gradients being reduced, in the compute dtype and float32. DDP adds its buckets, a
  second copy of the trained gradients.
- Optimizer: AdamW's two moments per trained parameter, dtype `w`; sharded 1/N.
- Activations: what autograd keeps for backward after the forward, tensor by tensor as this
  package's model saves them (tests/test_memory.py matches each layer's count byte for byte
  against reference/activations.py, and the whole step within 3%). With e the compute dtype's
  bytes, f = max(e, 4) (norms and log-softmax run in float32 or wider), a decoder layer over
  N = B T rows, R of which get the FFN (R = N without Skip-FFN), H / Hkv heads of D, F FFN width:
    norms       (N + R) C (f + 2e) + (N + R) f
    attention   N (2H + 2Hkv) D e + B H T f + B T T e (the mask as an additive bias)
    FFN         4 R F e, and with Skip-FFN R C e (the scatter's source) + 8 R once (the rows)
  A CLIP layer (trained tower only) over its N rows: N (8C + 3F + 4) e + N H f. Once per
  step: the ids and RoPE tables, the final norm, the answer tokens' logits (A V f for the
  log-softmax), the projector's inputs, Skip-Vision's pooled and merged rows. With activation
  checkpointing a layer keeps only its input (N C e) and backward rebuilds one layer at a time.
- Not counted: the CUDA context and kernels' workspaces (about 0.5-1 GiB), the caching
  allocator's fragmentation, NCCL's buffers, temporaries inside one op's backward.

Shapes: B micro-batch, T padded sequence (as arranged), I images, P image tokens, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import LlavaConfig, TextConfig, VisionConfig
from ..skip import SkipConfig
from .flops import Geometry, geometry, image_counts, merged

GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    """Bytes per GPU of one training step (see the module's convention)."""
    weights: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations


def decoder_layer(text: TextConfig, B: int, T: int, R: int | None, masked: bool,
                  e: int) -> dict[str, int]:
    """Bytes one decoder layer keeps for backward, by term; R rows get the FFN (None: all)."""
    N, C, D, f = B * T, text.hidden_size, text.head_dim, max(e, 4)
    H, Hkv, rows = text.num_attention_heads, text.num_key_value_heads, N if R is None else R
    terms = {"norms": (N + rows) * (C * (f + 2 * e) + f),
             "qkv": N * (H + 2 * Hkv) * D * e, "o_proj": N * H * D * e, "lse": B * H * T * f,
             "mask": B * T * T * e if masked else 0, "ffn": 4 * rows * text.intermediate_size * e}
    if R is not None:
        terms["scatter"] = R * C * e
    return terms


def vision_layer(vision: VisionConfig, N: int, e: int) -> int:
    """Bytes one CLIP encoder layer keeps for backward over N rows (a trained tower)."""
    return N * (8 * vision.hidden_size + 3 * vision.intermediate_size + 4) * e + (
        N * vision.num_attention_heads * max(e, 4))


def activations(cfg: LlavaConfig, g: Geometry, images: int, answer: int,
                skip: SkipConfig | None = None, checkpointing: bool = False, e: int = 2,
                train: tuple[str, ...] = ("projector", "language_model", "summary"),
                masked: bool = True) -> dict[str, int]:
    """Bytes kept for backward by one micro-batch's forward (`g`: its geometry), by part;
    `images` in the micro-batch, `answer` answer tokens in it (they get logits)."""
    text, vis, f = cfg.text, cfg.vision, max(e, 4)
    B, T, C, L = g.batch, g.width, text.hidden_size, text.num_hidden_layers
    N = B * T
    skip_layers = set() if skip is None else set(skip.ffn_layers(L))
    layers = [sum(decoder_layer(text, B, T, g.ffn_tokens[i] if i in skip_layers else None,
                                masked, e).values()) for i in range(L)]
    out = {"decoder layers": sum(layers) if not checkpointing else L * N * C * e + max(layers)}
    out["rope, ids, final norm, logits"] = (2 * N * text.head_dim * e + 8 * N + N * (
        C * (f + e) + f) + N + answer * (C * e + text.vocab_size * f + 8))
    if skip_layers:
        out["decoder layers"] += 8 * g.ffn_tokens[min(skip_layers)]
    P, S = cfg.image_seq_length, vis.image_size
    out["image rows"] = 16 * images * P  # where the features go (index_put)
    if "vision_tower" in train:
        n = images * ((S // vis.patch_size) ** 2 + 1)  # patches and CLS
        depth = max(cfg.feature_layers)
        stem = images * 3 * S * S * e + n * (vis.hidden_size + 2) * e  # conv, pre-layernorm
        out["vision tower"] = stem + (depth * vision_layer(vis, n, e) if not checkpointing else
                                      depth * n * vis.hidden_size * e + vision_layer(vis, n, e))
    if "vision_tower" in train or "projector" in train:
        out["projector"] = images * P * (vis.hidden_size * len(cfg.feature_layers) + 2 * C) * e
    if skip is not None and images:
        n, _, newlines = image_counts(cfg, 1)[0]
        M, kept = merged(skip, n, newlines)  # candidates, merged rows
        K = skip.retained
        per = 8 * (2 * M + M - kept) + e * (M * C + kept)  # candidates, ranks, merge
        if skip.summary:  # the pooled rows, their norm statistics and weights
            per += (e * (C + 3) + f) * (K + kept) + 8 * K
            per += e * C * (K + kept) * ("summary" in train)  # the trained scorer's input
        out["Skip-Vision rows"] = images * per + 8 * N
    return out


def sharded_bytes(shape: torch.Size, itemsize: int, gpus: int) -> int:
    """A parameter's bytes on the first of `gpus` GPUs: FSDP2 pads its rows to a multiple."""
    if not shape:  # a scalar is not split
        return itemsize
    rows = math.ceil(shape[0] / gpus)
    return rows * math.prod(shape[1:]) * itemsize


def plan(cfg: LlavaConfig, *, gpus: int = 1, micro_batch: int = 1, text: int = 64,
         images: int = 1, answer: int | None = None, skip: SkipConfig | None = None,
         shard: bool = False, checkpointing: bool = False, weight_bytes: int = 4,
         compute_bytes: int = 2, train=("projector", "language_model", "summary")) -> Plan:
    """Per-GPU bytes of one step: `micro_batch` sequences of `text` text tokens (`answer` of
    them answers; default all) and `images` images each, on `gpus` GPUs."""
    from ..training.parallel import units
    from ..training.train import set_trainable
    from ..vlm import Llava
    with torch.device("meta"):
        model = Llava(cfg.replace(summary_scorer=skip is not None and skip.summary))
    trained = {id(p) for _, p in set_trainable(model, train, skip)}
    params = list({id(p): p for p in model.parameters()}.values())
    n = gpus if shard else 1
    held = lambda ps: sum(sharded_bytes(p.shape, weight_bytes, n) for p in ps)
    mine = [p for p in params if id(p) in trained]
    weights, grads, optim = held(params), held(mine), 2 * held(mine)
    unit_params = [list({id(p): p for m in u for p in m.parameters()}.values())
                   for u in units(model)]
    if shard:
        in_units = {id(p) for u in unit_params for p in u}
        root = sum(p.numel() for p in params if id(p) not in in_units)
        sizes = sorted((sum(p.numel() for p in u) for u in unit_params), reverse=True)
        grad_unit = max(sum(p.numel() for p in u if id(p) in trained) for u in unit_params)
        gathered = (root + sum(sizes[:2])) * compute_bytes + grad_unit * (compute_bytes + 4)
    else:
        autocast = compute_bytes < weight_bytes
        gathered = sum(p.numel() for p in params) * compute_bytes if autocast else 0
        grads *= 2 if gpus > 1 else 1  # DDP's buckets
    g = geometry(cfg, [text] * micro_batch, images, skip)
    acts = activations(cfg, g, micro_batch * images, micro_batch * (
        text if answer is None else answer), skip, checkpointing, compute_bytes, tuple(train))
    return Plan(weights, grads, optim, gathered, sum(acts.values()))
