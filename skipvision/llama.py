"""LLaMA decoder (the language model of LLaVA-1.5: Vicuna-7B, LLaMA-2 architecture).

Mirrors transformers/models/llama/modeling_llama.py; module names equal the checkpoint's
(`language_model.model.layers.0.self_attn.q_proj`, ...). Pre-norm blocks with RMSNorm,
rotate-half RoPE, grouped-query attention through SDPA with an explicit boolean mask, SwiGLU.

Attention visibility comes from stored token positions, never from shapes or cache length:
query at position p sees a key at position k iff k <= p <= horizon(key). A plain token has an
infinite horizon, a padding slot horizon -1 (seen by nobody). Skip-Vision's `consistent`
mask gives skipped tokens a finite horizon (skip.py) and needs nothing here; Skip-FFN arrives
as row indices (`ffn_rows`): the one place the paper touches this file (grep "skip-vision
hook").

Shapes: B batch, T query len, S key len (cache + new), H heads, Hkv kv heads, D head dim,
C width, F ffn width.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .config import RopeConfig, TextConfig
from .kv_cache import FOREVER
from .vision import activation


class RMSNorm(nn.Module):
    """x / rms(x) in at least float32 (float64 stays float64), cast back, times the gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@lru_cache(maxsize=32)
def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (D/2,) in float64 for rope types default, linear and llama3."""
    inv = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":  # Llama 3.1 report: stretch low frequencies, keep high ones
        wavelen = 2 * math.pi / inv
        low_wl = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wl = rope.original_max_position_embeddings / rope.high_freq_factor
        scaled = torch.where(wavelen > low_wl, inv / rope.factor, inv)
        t = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - t) * scaled / rope.factor + t * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(pos: torch.Tensor, cfg: TextConfig, dtype: torch.dtype):
    """cos, sin tables (B, 1, T, D) for positions (B, T), computed in float64."""
    inv = rope_inv_freq(cfg.rope, cfg.head_dim).to(pos.device)
    freqs = pos.to(torch.float64)[..., None] * inv  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # rotate-half convention


def attention_mask(q_pos, k_pos, k_horizon) -> torch.Tensor:
    """(B, 1, T, S) bool: key visible iff k_pos <= q_pos <= k_horizon."""
    q = q_pos[:, :, None]
    mask = (k_pos[:, None, :] <= q) & (q <= k_horizon[:, None, :])
    # a padding query sees nothing; let it see everything so SDPA gives finite garbage, not NaN
    mask = mask | ~mask.any(-1, keepdim=True)
    return mask[:, None]


def is_plain_causal(pos, horizon) -> bool:
    """Whether that rule is SDPA's `is_causal` over a fresh sequence: every row at positions
    0..T-1, every horizon infinite (no padding, no `consistent` mask). Kernels then skip the
    fully masked blocks instead of reading a (B, 1, T, S) mask (about half the scores)."""
    arange = torch.arange(pos.shape[1], device=pos.device)
    return bool((horizon == FOREVER).all()) and torch.equal(pos, arange.expand_as(pos))


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = (cfg.num_attention_heads,
                                                 cfg.num_key_value_heads, cfg.head_dim)
        C, D, b = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * D, bias=b)
        self.k_proj = nn.Linear(C, self.n_kv * D, bias=b)
        self.v_proj = nn.Linear(C, self.n_kv * D, bias=b)
        self.o_proj = nn.Linear(self.n_head * D, C, bias=b)

    def project(self, x):  # (B, T, C) -> q (B, T, H*D), k, v (B, T, Hkv*D); fast/ fuses them
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, Hkv, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_head)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        C, Fd, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.act = activation(cfg.hidden_act)
        self.gate_proj, self.up_proj = nn.Linear(C, Fd, bias=b), nn.Linear(C, Fd, bias=b)
        self.down_proj = nn.Linear(Fd, C, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, ffn_rows=None):
        """`ffn_rows` (R,): flat indices into the B*T rows that get the FFN; None: all rows."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        if ffn_rows is None:
            return h + self.mlp(self.post_attention_layernorm(h))
        flat = h.flatten(0, 1)  # (B*T, C); skip-vision hook: Skip-FFN, the FFN on R rows only
        ffn = self.mlp(self.post_attention_layernorm(flat.index_select(0, ffn_rows)))  # (R, C)
        return flat.index_add(0, ffn_rows, ffn).view_as(h)


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, pos, horizon=None, cache=None, ffn_rows=None, prune=None):
        """Embeddings x (B, T, C) at positions (B, T) -> final normed hidden states (B, T', C).

        `horizon` (B, T): last query position that may see each token (default: forever).
        `cache`: a KVCache, extended in place. `ffn_rows`: per layer, None or the flat (B*T)
        indices of the rows that get the FFN (Skip-FFN). `prune(lm, i, x, pos, horizon)`: sees
        each layer's input and may drop rows from `prune.layer` on (T' <= T; pruning/)."""
        horizon = torch.full_like(pos, FOREVER) if horizon is None else horizon
        fresh = cache is None or len(cache) == 0
        starts = {0, *(cache.slots if cache is not None else ()), *([prune.layer] if prune else ())}
        for i, layer in enumerate(self.layers):
            if prune is not None:  # pruning hook: FastV, DART drop image rows inside the LM
                x, pos, horizon = prune(self, i, x, pos, horizon)
            if i in starts:  # the slots this layer (and the next ones) attend over
                k_pos, k_hor = (pos, horizon) if cache is None else cache.extend(pos, horizon, i)
                causal = fresh and is_plain_causal(pos, horizon)  # mask None: SDPA's is_causal
                mask = None if causal else attention_mask(pos, k_pos, k_hor)
                cos, sin = rope_cos_sin(pos, self.cfg, x.dtype)
            rows = None if ffn_rows is None else ffn_rows[i]
            x = layer(x, cos, sin, mask, cache, i, rows)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
