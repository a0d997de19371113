"""Checkpoint key names -> this package's parameter names, as tables of prefixes.

Our module names are the llava-hf Hub layout, so that layout maps to itself. Other layouts
differ only in prefixes:
- transformers 5 saves the vision tower without `vision_model.`;
- transformers 5 in memory prefixes everything with `model.` and keeps `lm_head` on top;
- original LLaVA (liuhaotian) uses `model.layers.*`, `lm_head`, `model.mm_projector.{0,2}`,
  and takes its vision tower from a CLIP repo (`vision_model.*`).
Keys that are buffers recomputed at load (rotary tables, position ids) or parts of a CLIP
repo LLaVA does not use (the text tower, projections) are ignored.
"""
from __future__ import annotations

import re

# (checkpoint prefix, our prefix); the first matching row wins, so longer prefixes come first.
LLAVA_PREFIXES = [
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),  # transformers 5 on disk
    ("multi_modal_projector.", "multi_modal_projector."),
    ("summary_scorer.", "summary_scorer."),
    ("image_newline", "image_newline"),  # LLaVA-NeXT
    ("model.language_model.", "language_model.model."),  # transformers 5 in memory
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.summary_scorer.", "summary_scorer."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
]

ORIGINAL_PREFIXES = [  # liuhaotian/llava-v1.5-*: a LlavaLlamaForCausalLM
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.summary_scorer.", "summary_scorer."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]

CLIP_PREFIXES = [("vision_model.", "vision_tower.vision_model.")]  # openai/clip-vit-*

IGNORED = re.compile(r"(rotary_emb\.inv_freq|position_ids|^text_model\.|^visual_projection\.|"
                     r"^text_projection\.|^logit_scale)")


def is_ignored(key: str) -> bool:
    return IGNORED.search(key) is not None


def map_key(key: str, prefixes=LLAVA_PREFIXES) -> str | None:
    """Our name for checkpoint key `key`, or None if no prefix row matches (unexpected)."""
    for theirs, ours in prefixes:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None
