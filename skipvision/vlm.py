"""LLaVA: CLIP vision tower + projector + LLaMA, with image features spliced into the prompt.

Mirrors LlavaForConditionalGeneration (transformers/models/llava/modeling_llava.py). Module
names equal the llava-hf checkpoint's: `vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head`. The prompt holds one image token per
image feature; their embeddings are replaced, in order, by the projected features.

Skip-Vision enters at two lines (grep "skip-vision hook"): `summary_scorer` holds the learned
summary-token scorer when the checkpoint has one, and `prepare` hands the plain input and its
images (`ImageTokens`) to the token policy `skip` (a SkipConfig, or a pruner of
skipvision/pruning), whose `arrange` returns the arranged input.

Shapes: B batch, T tokens, I images, N image tokens per image, C LLM width, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import anyres
from . import skip as skip_vision
from .config import LlavaConfig
from .errors import InputError, NonFiniteError
from .kv_cache import slots
from .llama import LlamaForCausalLM
from .seam import Layout
from .projector import MultiModalProjector
from .vision import VisionTower


@dataclass
class LMInput:
    """What the language model consumes: one prefill, plain or Skip-Vision-arranged."""
    embeds: torch.Tensor  # (B, T, C)
    pos: torch.Tensor  # (B, T) long, RoPE positions
    horizon: torch.Tensor  # (B, T) long, last query position allowed to see each token
    attention_mask: torch.Tensor  # (B, T) bool, False on padding
    ffn_rows: list | None = None  # per decoder layer: None, or the flat rows that get the FFN
    layout: Layout | None = None  # a token policy's: where every token came from
    prune: object = None  # a pruner dropping rows inside the LM (llama.LlamaModel: `prune`)


@dataclass
class ImageTokens:
    """The prompt's images as the plain input holds them, in prompt order (row-major)."""
    row: torch.Tensor  # (I,) batch row of each image
    cols: list[torch.Tensor]  # per image (N_i,): its tokens' columns, ascending, contiguous
    cls_attention: list[torch.Tensor] | None = None  # per image (N_i,): the CLS query's
    part: list[torch.Tensor] | None = None  # LLaVA-NeXT, (N_i,): 0 base, 1 tile, 2 newline


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = LlamaForCausalLM(cfg.text)
        if cfg.image_grid_pinpoints:  # LLaVA-NeXT: ends every row of tile features
            self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))
        self.summary_scorer = (skip_vision.SummaryScorer(cfg.text.hidden_size)  # skip-vision hook
                               if cfg.summary_scorer else None)

    def project(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """Selected CLIP hidden states, each (I, P, Cv) -> image features (I, N, C)."""
        if self.cfg.vision_feature_select_strategy == "default":
            hidden_states = [h[:, 1:] for h in hidden_states]  # drop CLS
        return self.multi_modal_projector(torch.cat(hidden_states, dim=-1))

    def image_features(self, pixel_values, image_sizes=None, cls_attention: bool = False):
        """Pixels (I, 3, S, S), or LLaVA-NeXT's tiles (I, tiles, 3, S, S) of images of
        image_sizes (I, 2) -> per image its features (N_i, C) in the LLM's embedding space,
        with `cls_attention` the CLS query's attention on each (N_i,) in the layer whose output
        is used (the last of `vision_feature_layer`), and LLaVA-NeXT's parts (N_i,)."""
        cfg, last = self.cfg, self.cfg.feature_layers[-1]
        if cls_attention and last == 0:
            raise InputError("vision_feature_layer 0 (the embeddings) has no attention to rank "
                             "image tokens by; Skip-Vision needs a layer >= 1")
        if cfg.image_grid_pinpoints:  # (I, tiles, ...) -> each image's own tiles, (tiles, ...)
            pixel_values = torch.cat([px[:k] for px, k in zip(pixel_values, anyres.tiles(
                cfg, image_sizes))])
        states, attn = self.vision_tower.hidden_states(pixel_values, cfg.feature_layers,
                                                       last if cls_attention else 0)
        feats = self.project(states)  # (tiles, N, C)
        if attn is not None and cfg.vision_feature_select_strategy == "default":
            attn = attn[:, 1:]  # the patches' features, not CLS
        if not cfg.image_grid_pinpoints:
            return list(feats), None if attn is None else list(attn), None
        return anyres.pack_all(cfg, image_sizes, feats, attn, self.image_newline)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C); image placeholders (any id, even -200) and padding
        embed as id 0. Every other id must be in the vocabulary."""
        skip = (input_ids == self.cfg.image_token_id) | ~attention_mask
        bad = ~skip & ((input_ids < 0) | (input_ids >= self.cfg.text.vocab_size))
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise InputError(f"input_ids[{b}, {t}] = {int(input_ids[b, t])} is not a token id: "
                             f"the vocabulary has ids 0..{self.cfg.text.vocab_size - 1} (and "
                             f"{self.cfg.image_token_id} marks image tokens)")
        return self.language_model.model.embed_tokens(input_ids.masked_fill(skip, 0))

    def image_tokens(self, input_ids, attention_mask, counts: list[int]) -> ImageTokens:
        """Where the images' tokens are: one contiguous block of counts[i] tokens per image."""
        is_image = (input_ids == self.cfg.image_token_id) & attention_mask
        found = int(is_image.sum())
        if found != sum(counts):
            raise InputError(
                f"the prompt holds {found} image tokens (id {self.cfg.image_token_id}) but the "
                f"{len(counts)} image(s) make {sum(counts)} ({counts}); expand each <image> to "
                "its image's tokens (the processor does this)")
        row, col = is_image.nonzero(as_tuple=True)  # row-major: images in prompt order
        rows, cols = row.split(counts), col.split(counts)
        if any(bool((r != r[0]).any()) or int(c[-1] - c[0]) != len(c) - 1
               for r, c in zip(rows, cols)):
            raise InputError("each image's tokens must be contiguous in one prompt")
        return ImageTokens(torch.stack([r[0] for r in rows]) if counts else row, list(cols))

    def check(self, input_ids, pixel_values, attention_mask, image_sizes) -> list[int]:
        """Validate a batch's tensors; the number of tokens of each image."""
        if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
                and input_ids.shape[0] > 0 and not input_ids.is_floating_point()):
            raise InputError("input_ids must be a (batch, tokens) integer tensor, batch >= 1")
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask is {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}: they must match")
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise InputError("the batch is padded on the right; pad on the left (generation "
                             "continues at the right edge; the processor does this)")
        if pixel_values is None:
            return []
        next_ = bool(self.cfg.image_grid_pinpoints)
        if not (isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4 + next_):
            raise InputError(f"pixel_values must be an (images, {'tiles, ' * next_}channels, "
                             "height, width) tensor")
        if not bool(torch.isfinite(pixel_values).all()):
            raise NonFiniteError("pixel_values hold NaN or inf (check the image preprocessing)")
        if not next_:
            return [self.cfg.image_seq_length] * pixel_values.shape[0]
        return anyres.check(self.cfg, pixel_values, image_sizes)

    def prepare(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                skip=None, image_sizes=None) -> LMInput:
        """Prompt ids (B, T) (+ pixels, left-padding mask) -> the language model's input."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        counts = self.check(input_ids, pixel_values, attention_mask, image_sizes)
        images = self.image_tokens(input_ids, attention_mask, counts)
        embeds = self.embed_text(input_ids, attention_mask)
        if counts:
            feats, images.cls_attention, images.part = self.image_features(
                pixel_values, image_sizes, skip is not None and skip.ranks_by_cls_attention)
            per = torch.tensor(counts, device=images.row.device)
            where = (images.row.repeat_interleave(per), torch.cat(images.cols))
            embeds = embeds.index_put(where, torch.cat(feats).to(embeds.dtype))  # (B, T, C)
        pos, horizon = slots(attention_mask)
        pos = pos if position_ids is None else position_ids
        inp = LMInput(embeds, pos, horizon, attention_mask)
        if skip is not None:  # skip-vision hook: a token policy (skip.py, or a pruner)
            inp = skip.arrange(inp, images, self.summary_scorer, self.cfg.text.num_hidden_layers,
                               position_ids)
        return inp

    def run(self, inp: LMInput, cache=None) -> torch.Tensor:
        """Language model on a prepared input -> final hidden states (B, T, C)."""
        return self.language_model.model(inp.embeds, inp.pos, inp.horizon, cache, inp.ffn_rows,
                                         inp.prune)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                cache=None, skip=None, image_sizes=None) -> torch.Tensor:
        """Logits (B, T, V) for the inputs LlavaForConditionalGeneration takes; with `skip`,
        T is the length of the arranged sequence (see seam.Layout)."""
        inp = self.prepare(input_ids, pixel_values, attention_mask, position_ids, skip,
                           image_sizes)
        return self.logits(self.run(inp, cache))
