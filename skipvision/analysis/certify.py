"""Certified answers: when Skip-FFN and Skip-KV provably leave a greedy answer unchanged
(proofs/error_bound.md, Corollary 3).

Every logit of the perturbed run lies within B of the full run's, B the l-infinity logit
bound (Lemma 7 after Theorems 1 and 2). So if the full run's top logit leads every other one
by more than 2B, the perturbed run picks the same token. Along the full run's greedy answer
(the perturbed run fed the same prefix), if every step is certified then, by induction over
the steps, the perturbed greedy answer is the same answer.

What is compared: the reference is Skip-Vision's arranged input with every FFN applied and
the whole cache kept; the perturbed run skips the FFN of the skipped tokens in the Skip-FFN
layers and evicts them from the cache after prefill, as `generate` does. The token reduction
itself (retained, merged and summary tokens in place of the image's) changes the input, not
the computation on it, and is not what the bound covers. Run the model in float64: the bound
is about exact arithmetic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..kv_cache import FOREVER, KVCache
from ..skip import SkipConfig
from . import bound


@dataclass
class Certificate:
    """One prompt's greedy answer, step by step (n steps, the last one its EOS)."""
    tokens: torch.Tensor  # (n,) the reference run's greedy answer
    margins: torch.Tensor  # (n,) its top logit minus the runner-up's, per step
    bounds: torch.Tensor  # (n,) the l-infinity logit bound (Theorems 1, 2 + Lemma 7) per step
    flipped: torch.Tensor  # (n,) bool, measured: the perturbed run's argmax differs there

    @property
    def steps(self) -> torch.Tensor:
        """(n,) bool: the steps whose token is certified (margin > 2 bound)."""
        return self.margins > 2 * self.bounds

    @property
    def certified(self) -> bool:
        return bool(self.steps.all())


@torch.no_grad()
def reference_answer(model, inp, max_new_tokens: int, eos_ids=None) -> torch.Tensor:
    """The greedy answer (n,) of the reference run: the arranged prompt `inp` (batch of 1)
    with every FFN applied and nothing evicted; stops after an EOS."""
    from ..generate import decode_step, prefill
    eos = set(model.cfg.text.eos_ids if eos_ids is None else eos_ids)
    cache = KVCache(model.cfg.text.num_hidden_layers)
    logits = prefill(model, dataclasses.replace(inp, ffn_rows=None), cache)
    pos, out = inp.pos.max(dim=1).values + 1, []
    for _ in range(max_new_tokens):
        tok = logits.argmax(-1)
        out.append(tok)
        if int(tok) in eos or len(out) == max_new_tokens:
            break
        logits = decode_step(model, tok, pos, cache)
        pos = pos + 1
    return torch.cat(out)


@torch.no_grad()
def certify(model, inp, skip: SkipConfig, answer: torch.Tensor) -> Certificate:
    """The certificate of `answer` (n,), the reference's greedy answer to the arranged prompt
    `inp` (batch of 1, from `model.prepare(..., skip=skip)`)."""
    if inp.embeds.shape[0] != 1 or inp.layout is None or answer.dim() != 1 or not len(answer):
        raise InputError("certify takes one Skip-Vision-arranged prompt and its answer (n,)")
    lm = model.language_model.model
    P, L = inp.embeds.shape[1], model.cfg.text.num_hidden_layers
    fed = answer[:-1].to(inp.pos.device)  # the answer is fed back, but for its last token
    x = torch.cat([inp.embeds, lm.embed_tokens(fed[None])], 1)
    step = torch.arange(1, len(fed) + 1, device=inp.pos.device)[None]
    pos = torch.cat([inp.pos, inp.pos.max() + step], 1)
    horizon = torch.cat([inp.horizon, torch.full_like(step, FOREVER)], 1)
    T = x.shape[1]
    skipped = [None] * L
    for i, rows in enumerate(inp.ffn_rows or [None] * L):
        if rows is not None:  # the rows that keep the FFN, in the prompt; decode rows all do
            skipped[i] = torch.ones(1, T, dtype=torch.bool)
            skipped[i][0, rows.cpu()] = False
            skipped[i][0, P:] = False
    horizon_new = horizon
    if skip.kv == "evict":  # Skip-KV: decode tokens no longer see the skipped tokens
        evicted = torch.cat([inp.layout.is_skipped, torch.zeros_like(step, dtype=torch.bool)], 1)
        horizon_new = torch.where(evicted, torch.minimum(horizon, inp.pos.max()), horizon)
    report = bound.compare(model, x, pos, horizon, horizon_new, None, skipped)
    rows = slice(P - 1, T)  # the positions that predict the answer's tokens
    full = model.logits(lm(x, pos, horizon))[0, rows].double()
    new = model.logits(lm(x, pos, horizon_new, None, bound.ffn_rows(
        bound.skip_masks(skipped, L, 1, T), x.device)))[0, rows]
    top = full.topk(2, dim=-1).values
    margin = torch.where(full.argmax(-1) == answer, top[:, 0] - top[:, 1], 0)  # a tie: none
    return Certificate(answer.cpu(), margin.cpu(),
                       report.final["logits_inf"][1][0, rows].cpu(),
                       (new.argmax(-1) != full.argmax(-1)).cpu())
