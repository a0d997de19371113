"""Make a transformers LLaVA compute in true float64, for 1e-9 parity tests.

transformers' LlamaRMSNorm casts its input to float32 and its rotary embedding computes
inv_freq, cos and sin in float32, even in a float64 model; that alone costs ~1e-7. These two
functions are replaced, per instance, by the same formulas without the float32 casts, and
inv_freq by the float64 oracle in reference/rope.py. Everything else is transformers' own.
"""
import types

import torch

from .rope import inv_freq


def _rmsnorm_forward(self, x):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h


def _rotary_forward(self, x, position_ids):
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq64.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def make_float64(hf_model, rope_cfg, head_dim: int):
    """Convert `hf_model` to float64 in place and remove its float32 shortcuts; returns it."""
    hf_model.to(torch.float64)
    for mod in hf_model.modules():
        name = type(mod).__name__
        if name.endswith("RMSNorm"):
            mod.forward = types.MethodType(_rmsnorm_forward, mod)
        elif name.endswith("RotaryEmbedding"):
            mod.inv_freq64 = inv_freq(rope_cfg, head_dim)
            mod.forward = types.MethodType(_rotary_forward, mod)
    return hf_model
