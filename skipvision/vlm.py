"""LLaVA: CLIP vision tower + projector + LLaMA, with image features spliced into the prompt.

Mirrors LlavaForConditionalGeneration (transformers/models/llava/modeling_llava.py). Module
names equal the llava-hf checkpoint's: `vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head`. The prompt holds one image token per
image feature; their embeddings are replaced, in order, by the projected features.

Skip-Vision plugs in at two places (grep "skip-vision hook"): `prepare` hands the prompt to
skip.py, which reorders and merges the image tokens; `summary_scorer` holds the learned
summary-token scorer when the checkpoint has one.

Shapes: B batch, T tokens, I images, Nv image tokens per image, C LLM width, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import skip as skipvision
from .config import LlavaConfig
from .kv_cache import FOREVER, NEVER
from .llama import LlamaForCausalLM
from .projector import MultiModalProjector
from .vision import VisionTower


@dataclass
class LMInput:
    """What the language model consumes: one prefill, plain or Skip-Vision-arranged."""
    embeds: torch.Tensor  # (B, T, C)
    pos: torch.Tensor  # (B, T) long, RoPE positions
    horizon: torch.Tensor  # (B, T) long, last query position allowed to see each token
    attention_mask: torch.Tensor  # (B, T) bool, False on padding
    ffn_rows: list | None = None  # per layer: flat row indices that get the FFN (Skip-FFN)
    layout: "skipvision.Layout | None" = None  # where every token went (Skip-Vision)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count valid tokens only; padding slots get 0."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = LlamaForCausalLM(cfg.text)
        self.summary_scorer = (skipvision.SummaryScorer(cfg.text.hidden_size)  # skip-vision hook
                               if cfg.summary else None)

    def project(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """Selected CLIP hidden states, each (I, P, Cv) -> image features (I, Nv, C)."""
        if self.cfg.vision_feature_select_strategy == "default":
            hidden_states = [h[:, 1:] for h in hidden_states]  # drop CLS
        return self.multi_modal_projector(torch.cat(hidden_states, dim=-1))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) pixels -> (I, Nv, C) features in the LLM's embedding space."""
        return self.project(self.vision_tower.hidden_states(pixel_values, self.cfg.feature_layers))

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C); image placeholders (any id, even -200) embed as id 0."""
        ids = input_ids.masked_fill(input_ids == self.cfg.image_token_id, 0)
        return self.language_model.model.embed_tokens(ids)

    def splice(self, input_ids, embeds, features) -> torch.Tensor:
        is_image = input_ids == self.cfg.image_token_id
        n_tokens, n_feats = int(is_image.sum()), features.shape[0] * features.shape[1]
        if n_tokens != n_feats:
            raise ValueError(
                f"the prompt holds {n_tokens} image tokens (id {self.cfg.image_token_id}) but the "
                f"{features.shape[0]} image(s) give {n_feats} features ({features.shape[1]} each); "
                "expand each <image> to that many tokens (the processor does this)")
        out = embeds.clone()
        out[is_image] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return out

    def prepare(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                skip=None) -> LMInput:
        """Prompt ids (B, T) (+ pixels, left-padding mask) -> the language model's input."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        if skip is not None:  # skip-vision hook: split, merge, summary, layout
            return skipvision.prepare(self, input_ids, pixel_values, attention_mask, skip,
                                      position_ids)
        embeds = self.embed_text(input_ids)
        if pixel_values is not None:
            embeds = self.splice(input_ids, embeds, self.image_features(pixel_values))
        elif bool((input_ids == self.cfg.image_token_id).any()):
            raise ValueError("the prompt holds image tokens but no pixel_values were given")
        pos = positions_from_mask(attention_mask) if position_ids is None else position_ids
        horizon = torch.where(attention_mask, FOREVER, NEVER)
        return LMInput(embeds, pos, horizon, attention_mask)

    def run(self, inp: LMInput, cache=None) -> torch.Tensor:
        """Language model on a prepared input -> final hidden states (B, T, C)."""
        return self.language_model.model(inp.embeds, inp.pos, inp.horizon, cache, inp.ffn_rows)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                cache=None, skip=None) -> torch.Tensor:
        """Logits (B, T, V) for the same inputs LlavaForConditionalGeneration takes.

        With `skip`, T is the length of the Skip-Vision arranged sequence (see skip.Layout).
        """
        inp = self.prepare(input_ids, pixel_values, attention_mask, position_ids, skip)
        return self.logits(self.run(inp, cache))
