"""Generation at the hardware's limit, opt-in: a pre-allocated KV cache (cache.py), a compiled
decode step, and fused projections (fuse.py). Each path gives the same tokens as the plain one
(tests/test_fast.py); `generate` here is skipvision.generate with them plugged in.
"""
from __future__ import annotations

import warnings

import torch
import torch._inductor.config as inductor_config

from ..errors import InputError
from ..generate import decode_step
from ..generate import generate as plain_generate
from .cache import StaticKVCache
from .fuse import fuse

__all__ = ["StaticKVCache", "compiled_step", "fuse", "generate"]


class compiled_step:
    """decode_step through torch.compile (shapes fixed by the static cache: one compile), with
    Inductor's freezing: the weights become constants of the compiled step, pre-packed for the
    CPU's matrix kernels (a compiled step belongs to one model, whose weights must not change
    after its first call; the packed copies take memory beside the weights). Where compiling
    is not possible (no working C++ compiler, an unsupported Python), it says why once and
    decodes eagerly."""

    def __init__(self):
        self.fn, self.failed = torch.compile(decode_step, dynamic=False), None
        if not torch._dynamo.is_dynamo_supported():
            self.fail("torch.compile is not supported on this Python")

    def fail(self, why: str):
        self.failed = why
        warnings.warn(f"decoding eagerly: {why}", RuntimeWarning, stacklevel=3)

    def __call__(self, model, tokens, pos, cache):
        if self.failed is None:
            try:
                with warnings.catch_warnings(), inductor_config.patch(freezing=True):
                    # rope_inv_freq is pure: tracing through its cache is exact
                    warnings.filterwarnings("ignore", ".*functools.lru_cache", UserWarning)
                    return self.fn(model, tokens, pos, cache)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                self.fail(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]})")
        return decode_step(model, tokens, pos, cache)


def generate(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=32,
             static: bool = True, compile: bool = False, step=None, **kw):
    """skipvision.generate with a static KV cache (`static`) and a compiled decode step
    (`compile`, which needs `static`; pass `step=` to reuse one compiled step across calls)."""
    if compile and not static:
        raise InputError("compile=True needs static=True: a compiled step wants fixed shapes")
    cache = StaticKVCache(model.cfg.text.num_hidden_layers, max_new_tokens) if static else None
    step = step or (compiled_step() if compile else decode_step)
    return plain_generate(model, input_ids, pixel_values, attention_mask, max_new_tokens,
                          cache=cache, step=step, **kw)
