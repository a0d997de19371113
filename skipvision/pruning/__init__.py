"""Training-free visual-token pruners beside Skip-Vision, each a token policy on the seam.

A `Prune` is passed where a SkipConfig goes (`generate(..., skip=Prune("divprune", 32))`,
`model.prepare`, `evaluate`): the model calls its `arrange` at the same hook. Methods:

- at the seam (the LLM's input), per image `budget` tokens given to the LLM:
  `random` (seeded), `visionzip` (arXiv 2412.04467), `divprune` (arXiv 2503.02175);
- inside the LLM, after layer `layer` (K): `fastv` (arXiv 2403.06764), `dart` (arXiv
  2502.11494). The first K layers see every token; the later ones, and their KV cache, only
  the kept ones (the cache holds two groups of slots, kv_cache.py).

No method forms an attention matrix inside the language model: FastV scores from the last
query's row alone, so SDPA (or FlashAttention) still runs every layer. Shapes: N tokens of
one image, C LLM width, B batch, T tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ConfigError, InputError, check_fields
from ..seam import RETAINED, assemble
from . import inlm, select

SEAM = {"random": select.random, "visionzip": select.visionzip, "divprune": select.divprune}
IN_LM = {"fastv": inlm.fastv_scores, "dart": inlm.dart_scores}
METHODS = (*SEAM, *IN_LM)


@dataclass(frozen=True)
class Prune:
    """One pruning method at one budget: the visual tokens per image the LLM keeps."""
    method: str
    budget: int  # tokens kept per image (VisionZip: dominant + contextual)
    seed: int = 0  # random
    layer: int = 2  # fastv, dart: K, the layers that see every token (both papers' K = 2)
    contextual: int | None = None  # visionzip: merged tokens; None: the paper's 10 of 64
    pivots: int | None = None  # dart: pivot tokens per image; None: budget // 8, at least 1
    kv = "keep"  # nothing to evict after prefill (generate.py's Skip-KV hook reads this)

    def __post_init__(self):
        check_fields(self, "Prune.", dict(method=("str", METHODS), budget=("int", (1, 1 << 20)),
                                          seed=("int", (0, (1 << 63) - 1)),
                                          layer=("int", (1, 1 << 10)),
                                          contextual=("int?", (0, 1 << 20)),
                                          pivots=("int?", (1, 1 << 20))))
        if self.contextual is not None and self.contextual > self.budget:
            raise ConfigError(f"Prune.contextual {self.contextual} exceeds the budget "
                              f"{self.budget}")
        if self.pivots is not None and self.pivots > self.budget:
            raise ConfigError(f"Prune.pivots {self.pivots} exceeds the budget {self.budget}")

    @property
    def n_contextual(self) -> int:
        """VisionZip's split: 54 dominant + 10 contextual of 64 (paper, Sec. 4)."""
        return round(self.budget * 10 / 64) if self.contextual is None else self.contextual

    @property
    def ranks_by_cls_attention(self) -> bool:  # whether the tower must report it
        return self.method == "visionzip"

    @property
    def n_pivots(self) -> int:
        return max(1, self.budget // 8) if self.pivots is None else self.pivots

    def arrange(self, plain, images, scorer, n_layers: int, position_ids=None):
        """The token-policy protocol (vlm.Llava.prepare's hook; skip.SkipConfig has it too)."""
        if position_ids is not None:
            raise InputError("position_ids cannot be combined with pruning: positions follow "
                             "the kept tokens")
        if any(self.budget > len(c) for c in images.cols):
            raise ConfigError(f"Prune.budget {self.budget} exceeds the "
                              f"{min(len(c) for c in images.cols)} tokens of an image")
        if self.method in IN_LM:
            if self.layer >= n_layers:
                raise ConfigError(f"Prune.layer {self.layer}: the decoder has {n_layers} "
                                  "layers; pruning after all of them prunes nothing")
            return dataclasses.replace(plain, prune=inlm.InLM(self, plain, images,
                                                                 IN_LM[self.method]))
        B, T, C = plain.embeds.shape
        flat = plain.embeds.flatten(0, 1)  # (B*T, C)
        made, segments, kinds, kept = [], [], [], []
        for i, (b, cols) in enumerate(zip(images.row.tolist(), images.cols)):
            attn = None if images.cls_attention is None else images.cls_attention[i]
            keep, extra = SEAM[self.method](self, flat[b * T + cols], attn)  # (n,), (m, C)
            first = B * T + sum(len(m) for m in made)
            rows = torch.arange(first, first + len(extra), device=flat.device)
            segments.append(torch.cat([b * T + cols[keep], rows]))
            kinds.append(torch.full_like(segments[-1], RETAINED))
            made.append(extra)
            kept.append(keep)
        inp, col = assemble(plain, images, torch.cat([flat[:0], *made]), segments, kinds)
        inp.layout.dest = [torch.full((len(c),), -1, device=col.device).index_put(
            (k,), col[s[:len(k)]]) for c, k, s in zip(images.cols, kept, segments)]
        return inp


def name(policy) -> str:
    """A short label for a token policy: 'plain', 'skip-vision 25/39', 'divprune 32'."""
    if policy is None:
        return "plain"
    if isinstance(policy, Prune):
        return f"{policy.method} {policy.budget}"
    return f"skip-vision {policy.retained}/{policy.skipped}"
