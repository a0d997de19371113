"""Skip-Vision (Zeng et al., ICCV 2025, arXiv 2503.21817) on top of the plain LLaVA."""
from __future__ import annotations

import torch


def skip_ffn(h: torch.Tensor, mlp, norm, rows: torch.Tensor) -> torch.Tensor:
    """Skip-FFN (paper sec. 3.2): h + mlp(norm(h)) on the flat rows `rows` only, h elsewhere.

    h (B, T, C); rows (R,) indices into B*T. The FFN runs on R rows, forward and backward.
    """
    B, T, C = h.shape
    flat = h.reshape(B * T, C)
    return flat.index_add(0, rows, mlp(norm(flat.index_select(0, rows)))).view(B, T, C)


class SummaryScorer(torch.nn.Module):
    """LayerNorm(C) then Linear(C, 1): a score per token for softmax pooling (paper sec. 3.3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.score = torch.nn.Linear(dim, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)
