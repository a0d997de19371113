"""RoPE inverse frequencies written one frequency at a time with Python floats (float64)."""
import math

import torch


def inv_freq(rope, head_dim: int) -> torch.Tensor:
    """rope: a skipvision RopeConfig (only its numbers are read)."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / rope.theta ** (i / head_dim)
        if rope.rope_type == "linear":
            f = f / rope.factor
        elif rope.rope_type == "llama3":
            # Llama 3.1: wavelengths longer than orig/low are stretched by `factor`, shorter
            # than orig/high kept, and the band in between interpolated linearly in 1/wavelength.
            wavelen = 2 * math.pi / f
            orig = rope.original_max_position_embeddings
            if wavelen > orig / rope.low_freq_factor:
                f = f / rope.factor
            elif wavelen >= orig / rope.high_freq_factor:
                s = (orig / wavelen - rope.low_freq_factor) / (
                    rope.high_freq_factor - rope.low_freq_factor)
                f = (1 - s) * f / rope.factor + s * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)
