"""Helpers of the attained-bound tests: a tiny text config, weights set by hand, and the
check that a term is attained (measured <= bound up to rounding, measured >= ratio x bound)."""
from __future__ import annotations

import torch

from bound_support import ATOL, ATTAINED, RTOL
from skipvision.config import TextConfig

T_STAR = 2.399357280515  # argmax of SiLU'; SiLU'(T_STAR) = 1.09984...
f64 = dict(dtype=torch.float64)


def config(**kw) -> TextConfig:
    base = dict(vocab_size=4, hidden_size=2, intermediate_size=2, num_hidden_layers=1,
                num_attention_heads=1, head_dim=2, rms_norm_eps=1e-4, mlp_bias=True,
                attention_bias=True, max_position_embeddings=128)
    return TextConfig(**{**base, **kw})


def set_weights(module, weights: dict) -> None:
    """Every parameter zero (norm gains one), then the given ones."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        for name, value in weights.items():
            module.get_parameter(name).copy_(torch.as_tensor(value, **f64))


def check(name: str, measured: float, b: float, ratio: float, size: float = 1.0):
    """measured <= bound up to rounding, and measured >= ratio x bound (attained)."""
    ATTAINED[name] = measured / b
    assert measured <= b * (1 + RTOL) + ATOL * size, (name, measured, b)
    assert measured >= ratio * b, (name, measured, b, measured / b)


def silu(t: float) -> float:
    return t * torch.sigmoid(torch.tensor(t, **f64)).item()
