"""Token slots: left-padded rows, their positions and horizons; and the KV cache that keeps them.

Every token the language model sees sits in a slot with a RoPE position and a horizon (the
last query position allowed to see it). Rows of a batch are padded on the left, so generation
continues at the right edge; positions count a row's real tokens only (`slots`).

The cache is a plain object, created by `generate` and passed to the model; no module owns
it. Positions and horizons are shared by all layers (every layer caches the same tokens). Keys
are stored after RoPE, so removing slots (Skip-KV eviction) never changes a kept key; new
queries take their positions from the caller, never from the number of cached slots.

Shapes: B batch, Hkv kv heads, S slots, D head dim.
"""
from __future__ import annotations

import torch

NEVER = -1  # horizon of a padding slot: visible to no query
FOREVER = torch.iinfo(torch.int64).max  # horizon of an ordinary token


def left_pad(rows: list[torch.Tensor], fill) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (L_b, ...) -> (B, T, ...) padded on the left with `fill`, and the (B, T) bool mask
    of real entries; T is the longest row."""
    T = max((len(r) for r in rows), default=0)
    first = rows[0]
    out = first.new_full((len(rows), T, *first.shape[1:]), fill)
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=first.device)
    for b, r in enumerate(rows):
        out[b, T - len(r):], mask[b, T - len(r):] = r, True
    return out, mask


def slots(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and horizons (B, T) of a left-padded batch with real tokens where `mask`:
    positions count real tokens from 0; a padding slot gets position 0 and is never seen."""
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    return pos, torch.where(mask, FOREVER, NEVER)


class KVCache:
    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.slots: dict[int, tuple] = {}  # first layer of a group -> its (pos, horizon) (B, S)

    pos = property(lambda self: self.slots[0][0] if self.slots else None)  # (B, S) long
    horizon = property(lambda self: self.slots[0][1] if self.slots else None)  # NEVER: padding

    def __len__(self) -> int:
        return 0 if self.pos is None else self.pos.shape[1]

    def extend(self, pos: torch.Tensor, horizon: torch.Tensor, first: int = 0):
        """Register new slots for the layers from `first` to the next group's first layer (one
        group unless a pruner dropped rows inside the LM); returns that group's (B, S) each."""
        if first in self.slots:
            old_pos, old_horizon = self.slots[first]
            pos, horizon = torch.cat([old_pos, pos], 1), torch.cat([old_horizon, horizon], 1)
        self.slots[first] = pos, horizon
        return pos, horizon

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append (B, Hkv, T, D) keys/values of one layer; returns all (B, Hkv, S, D)."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the slots where mask (B, S) is True, in order, in every layer. Rows may
        keep different counts: each is compacted to the left and padded on the right with
        invisible slots (horizon NEVER). The old tensors are released: the memory is freed."""
        if len(self.slots) > 1:
            raise ValueError("KVCache.keep needs one group of slots (not after in-LM pruning)")
        order, filler = compaction(mask)
        self.slots[0] = (self.pos.gather(1, order),
                         self.horizon.gather(1, order).masked_fill(filler, NEVER))
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if k is None:
                continue
            idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, Hkv, W, D)
            self.k[i], self.v[i] = k.gather(2, idx), v.gather(2, idx)

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values (all layers)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


def compaction(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots to keep (B, S) -> the (B, W) order putting each row's kept slots first, in their
    order (W: the most any row keeps), and the (B, W) mask of the slots past a row's count."""
    n_keep = mask.sum(1)
    width = int(n_keep.max()) if mask.shape[0] else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, W)
    return order, torch.arange(width, device=mask.device)[None] >= n_keep[:, None]
