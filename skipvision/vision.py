"""CLIP ViT vision tower, as LLaVA uses it.

Mirrors transformers/models/clip/modeling_clip.py (CLIPVisionTransformer). Module names equal
the checkpoint's (`vision_tower.vision_model.embeddings.class_embedding`, ...). LLaVA reads an
intermediate hidden state, not the tower's output: `hidden_states[0]` is the pre-layrnorm'd
embedding and `hidden_states[i]` the output of layer i, so layer -2 of 24 is layer 23's output
and the last layer and `post_layernorm` are never run (they exist so checkpoints load).

Shapes: B batch, N patches, P = N + 1 positions (CLS first), C width, H heads, D head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .errors import InputError


def activation(name: str):
    if name == "quick_gelu":  # CLIP's approximation, x * sigmoid(1.702 x)
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return {"silu": F.silu, "relu": F.relu}[name]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, height, width = pixel_values.shape
        if height != self.cfg.image_size or width != self.cfg.image_size:
            raise InputError(f"pixel_values are {height}x{width}; this vision tower takes "
                             f"{self.cfg.image_size}x{self.cfg.image_size} images (preprocess them)")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, P, C)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj, self.k_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.v_proj, self.out_proj = nn.Linear(C, C), nn.Linear(C, C)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, P, _ = x.shape
        return x.view(B, P, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, P, D)

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P): the attention probabilities of the CLS query (position 0), summed over heads.
        Only the CLS row is computed, never the (P, P) map. Skip-Vision ranks patches by it."""
        q = self.heads(self.q_proj(x[:, :1]))  # (B, H, 1, D)
        k = self.heads(self.k_proj(x))  # (B, H, P, D)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * self.head_dim ** -0.5  # (B, H, P)
        return scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, C = x.shape
        q, k, v = self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale D^-1/2
        return self.out_proj(y.transpose(1, 2).reshape(B, P, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor, cls_attention: bool = False):
        """(B, P, C) -> (B, P, C); with `cls_attention`, also the CLS query's attention (B, P)
        (inside forward, so that sharded training has gathered this layer's weights)."""
        h = self.layer_norm1(x)
        x = x + self.self_attn(h)
        x = x + self.mlp(self.layer_norm2(x))
        return (x, self.self_attn.cls_attention(h)) if cls_attention else x


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, HF name
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # unused


class VisionTower(nn.Module):
    """`vision_tower` of a llava-hf checkpoint; `hidden_states(px, idx)` runs only what is needed."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)

    def hidden_states(self, pixel_values: torch.Tensor, indices, cls_attention_in: int = 0):
        """The entries `indices` (0..num_layers, as in HF's hidden_states tuple), each (B, P, C),
        and the CLS query's attention (B, P) in layer `cls_attention_in` (1-based; 0: None)."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        states, cls = {0: x}, None
        for i, layer in enumerate(vm.encoder.layers[:max(indices)], start=1):
            if i == cls_attention_in:
                x, cls = layer(x, cls_attention=True)
            else:
                x = layer(x)
            if i in indices:
                states[i] = x
        return [states[i] for i in indices], cls
