"""The bytes autograd keeps for backward, measured: the oracle for analysis/memory.py.

Every tensor saved for backward during `fn()` passes through a pack hook, which wraps it in a
holder the graph keeps in its place. After `fn()`, the holders still alive are those the graph
will read in backward (a branch that does not reach the output, such as Skip-Vision's
similarity ranking, is freed with its holders). Their distinct storages, parameters and the
given inputs excluded, are the activation memory of a training step's forward.
"""
from __future__ import annotations

import weakref

import torch


class _Held:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def saved_bytes(fn, exclude=()) -> tuple[int, object]:
    """(bytes of the distinct storages the graph of `fn()` keeps for backward, fn's output)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    held: list[weakref.ref] = []

    def pack(t):
        h = _Held(t.detach())  # the storage, not the graph: no node -> holder -> node cycle
        held.append(weakref.ref(h))
        return h

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        out = fn()
    storages = {}
    for ref in held:
        h = ref()
        if h is not None:
            s = h.t.untyped_storage()
            if s.data_ptr() not in skip:
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values()), out
