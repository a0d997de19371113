"""LLaVA-1.5 `mlp2x_gelu` projector: CLIP features -> LLM embedding space.

Mirrors LlavaMultiModalProjector in transformers/models/llava/modeling_llava.py.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import LlavaConfig
from .vision import activation


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)  # several layers are concatenated
        d, b = cfg.text.hidden_size, cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(d_in, d, bias=b)
        self.act = activation(cfg.projector_hidden_act)
        self.linear_2 = nn.Linear(d, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
