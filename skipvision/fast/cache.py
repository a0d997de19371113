"""A pre-allocated (static) KV cache: every layer's keys and values live in one buffer of
`capacity` slots, allocated at the prefill, written in place, and attended over whole (the
slots not yet written are invisible: horizon NEVER). Shapes never change from step to step,
so a compiled decode step compiles once (torch.compile), as in gpt-fast.

Skip-KV's eviction compacts the kept slots to the front of the buffers: the evicted slots are
free and the next tokens are written into them, but the allocation stays `capacity` slots:
`nbytes()` counts the slots in use, `allocated_bytes()` what is allocated. One group of slots
only: the pruners that drop rows inside the LLM (FastV, DART) need the dynamic KVCache.

Shapes: B batch, Hkv kv heads, S capacity, T new slots, D head dim.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..kv_cache import NEVER, KVCache, compaction


class StaticKVCache(KVCache):
    def __init__(self, n_layers: int, new_tokens: int):
        """Room for the prompt (its arranged length, known at the prefill) + `new_tokens`."""
        super().__init__(n_layers)
        self.new_tokens = new_tokens
        self.used = None  # (,) long: slots written so far (the same in every row)

    def extend(self, pos: torch.Tensor, horizon: torch.Tensor, first: int = 0):
        if first != 0:
            raise InputError("the static KV cache holds one group of slots; pruning inside the "
                             "LLM (FastV, DART) needs the dynamic cache (static=False)")
        B, T = pos.shape
        if self.used is None:
            S = T + self.new_tokens
            self.slots[0] = (pos.new_zeros(B, S), pos.new_full((B, S), NEVER))
            self.used = torch.zeros((), dtype=torch.long, device=pos.device)
        if not torch.compiler.is_compiling() and T + int(self.used) > self.pos.shape[1]:
            raise InputError(f"the static KV cache holds {self.pos.shape[1]} slots: "
                             f"{int(self.used)} used, {T} more asked for")
        self.at = self.used + torch.arange(T, device=pos.device)  # (T,) the slots written
        self.pos.index_copy_(1, self.at, pos)
        self.horizon.index_copy_(1, self.at, horizon)
        self.used.add_(T)
        return self.pos, self.horizon

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.pos.shape[1], D)
            self.v[layer] = v.new_zeros(B, H, self.pos.shape[1], D)
        self.k[layer].index_copy_(2, self.at, k)
        self.v[layer].index_copy_(2, self.at, v)
        return self.k[layer], self.v[layer]

    def keep(self, mask: torch.Tensor) -> None:
        """Compact the slots where mask (B, S_used) is True to the front, in order; the rest
        are free for the next tokens (still allocated)."""
        n = int(self.used)
        order, filler = compaction(mask[:, :n])
        W = order.shape[1]
        self.pos[:, :W] = self.pos[:, :n].gather(1, order)
        self.horizon[:, :W] = self.horizon[:, :n].gather(1, order).masked_fill(filler, NEVER)
        self.horizon[:, W:] = NEVER
        for k, v in zip(self.k, self.v):
            idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, Hkv, W, D)
            k[:, :, :W], v[:, :, :W] = k[:, :, :n].gather(2, idx), v[:, :, :n].gather(2, idx)
        self.used.fill_(W)

    def nbytes(self) -> int:
        """Bytes of the slots in use, all layers (see allocated_bytes)."""
        full = self.allocated_bytes()
        return 0 if not full else full * int(self.used) // self.pos.shape[1]

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
