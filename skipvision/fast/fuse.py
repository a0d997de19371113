"""Fused projections, made at load time: q, k and v in one matrix product, and the FFN's gate
and up in another (fewer, larger products: fewer operations per decoded token). The modules
keep their checkpoint names outside: `state_dict()` splits the fused weights back into
q_proj / k_proj / v_proj and gate_proj / up_proj, and `load_state_dict` fuses them, so
checkpoints are saved and read with the original names.
"""
from __future__ import annotations

import torch
from torch import nn

from ..llama import MLP, Attention

FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


class FusedAttention(Attention):
    def project(self, x):  # (B, T, C) -> q (B, T, H*D), k, v (B, T, Hkv*D)
        D = self.head_dim
        return self.qkv_proj(x).split([self.n_head * D, self.n_kv * D, self.n_kv * D], -1)


class FusedMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(self.act(gate) * up)  # SwiGLU


def fuse(model: nn.Module) -> nn.Module:
    """Fuse every decoder layer's projections in place; returns the model."""
    for module in list(model.modules()):
        kind = {Attention: FusedAttention, MLP: FusedMLP}.get(type(module))
        if kind is None:
            continue
        fused, parts = FUSED["self_attn" if kind is FusedAttention else "mlp"]
        linears = [getattr(module, p) for p in parts]
        sizes = [lin.out_features for lin in linears]
        bias = linears[0].bias is not None
        one = nn.Linear(linears[0].in_features, sum(sizes), bias=bias,
                        device=linears[0].weight.device, dtype=linears[0].weight.dtype)
        with torch.no_grad():
            one.weight.copy_(torch.cat([lin.weight for lin in linears]))
            if bias:
                one.bias.copy_(torch.cat([lin.bias for lin in linears]))
        for p in parts:
            delattr(module, p)
        module.add_module(fused, one)
        module.__class__ = kind
        module.fused_sizes = sizes
        module.register_state_dict_post_hook(_split)
        module.register_load_state_dict_pre_hook(_join)
    return model


def _names(module):
    return FUSED["self_attn" if isinstance(module, FusedAttention) else "mlp"]


def _split(module, state, prefix, local_metadata):
    """state_dict: the fused weight (and bias) back under the checkpoint's names."""
    fused, parts = _names(module)
    for kind in ("weight", "bias"):
        key = f"{prefix}{fused}.{kind}"
        if key in state:
            for p, t in zip(parts, state.pop(key).split(module.fused_sizes)):
                state[f"{prefix}{p}.{kind}"] = t


def _join(module, state, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict: the checkpoint's separate weights fused."""
    fused, parts = _names(module)
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{p}.{kind}" for p in parts]
        if all(k in state for k in keys):
            state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys])
