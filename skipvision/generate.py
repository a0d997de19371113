"""Generation as small functions: sample, prefill, decode_step, generate.

Batches are left-padded; every row's next position is one past its own last prompt
position (taken from the prefill's positions, never from the cache length). Skip-KV plugs in
at one place (grep "skip-vision hook"): after prefill, the skipped tokens leave the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import math

import torch

from .errors import InputError, NonFiniteError
from .kv_cache import FOREVER, KVCache
from .vlm import LMInput, Llava


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V). temperature 0 is greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature, top_k, top_p) -> None:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (number(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool)
                                  and top_k >= 1):
        raise InputError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not (number(top_p) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def finite(logits: torch.Tensor, when: str) -> torch.Tensor:
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(logits)).any(-1).nonzero().squeeze(1).tolist()
        raise NonFiniteError(f"the logits {when} hold NaN or inf (batch rows {rows}): the "
                             "weights or the dtype overflow (try float32 or bfloat16)")
    return logits


def prefill(model: Llava, inp: LMInput, cache: KVCache) -> torch.Tensor:
    """Run the prompt, filling the cache; returns the last position's logits (B, V)."""
    if not bool(inp.attention_mask.any(1).all()):
        raise InputError("a prompt is empty (after Skip-Vision's arrangement, if any): "
                         "give it text or keep some image tokens")
    return finite(model.logits(model.run(inp, cache)[:, -1]), "of the prompt")


def decode_step(model: Llava, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache):
    """One token per row, tokens (B,) at positions (B,) -> logits (B, V)."""
    x = model.language_model.model.embed_tokens(tokens[:, None])  # (B, 1, C)
    pos = pos[:, None]
    h = model.language_model.model(x, pos, torch.full_like(pos, FOREVER), cache)
    return model.logits(h[:, -1])


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) new tokens; after a row's EOS, filled with that EOS
    lengths: torch.Tensor  # (B,) new tokens per row, EOS included
    prompt_tokens: int  # prefill length (padded), after Skip-Vision's rearrangement
    kv_bytes: dict = field(default_factory=dict)  # cache after prefill, eviction, the last step


@torch.inference_mode()
def generate(model: Llava, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, eos_ids=None, skip=None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             image_sizes: torch.Tensor | None = None, cache=None, step=decode_step) -> Generation:
    """Prefill then decode until every row emitted an EOS or `max_new_tokens` were made.

    input_ids (B, T) left-padded, image tokens expanded; `skip` a SkipConfig or None;
    `image_sizes` (I, 2) the images' heights and widths for LLaVA-NeXT.
    `on_token(tokens)` receives each step's (B,) tokens as they come (streaming, timing);
    `cache` and `step`: skipvision/fast's static cache and compiled decode step."""
    eos_ids = model.cfg.text.eos_ids if eos_ids is None else tuple(eos_ids)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or (
            max_new_tokens < 0):
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    device = input_ids.device
    inp = model.prepare(input_ids, pixel_values, attention_mask, skip=skip,
                        image_sizes=image_sizes)
    context = model.cfg.text.max_position_embeddings
    used = int(inp.pos.max()) + 1 if inp.pos.numel() else 0
    if used + max_new_tokens > context:
        raise InputError(f"the prompt ({used} positions) plus max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's context of {context}")
    cache = KVCache(model.cfg.text.num_hidden_layers) if cache is None else cache
    logits = prefill(model, inp, cache)
    kv_bytes = {"prefill": cache.nbytes()}
    if inp.layout is not None and skip.kv == "evict":  # skip-vision hook: Skip-KV
        cache.keep(~inp.layout.is_skipped)
    kv_bytes["after_eviction"] = cache.nbytes()
    pos = inp.pos.max(dim=1).values + 1  # (B,) one past each row's last prompt position
    B = input_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out, lengths = [], torch.zeros(B, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, generator)
        if i > 0:
            tok = torch.where(done, out[-1], tok)
        out.append(tok)
        lengths += (~done).long()
        done = done | torch.isin(tok, eos)
        if on_token is not None:
            on_token(tok)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = finite(step(model, tok, pos, cache), f"at decode step {i + 1}")
        pos = pos + 1
    kv_bytes["final"] = cache.nbytes()
    tokens = torch.stack(out, 1) if out else input_ids.new_zeros(B, 0)
    return Generation(tokens, lengths, inp.embeds.shape[1], kv_bytes)
