"""Images and questions in, model inputs out; generated ids back to text.

Images go through images.py. Text goes through the `tokenizers` library from `tokenizer.json`;
each `<image>` placeholder becomes `cfg.image_seq_length` image tokens of id
`cfg.image_token_id` (a vocab id for llava-hf, the sentinel -200 for original LLaVA). Batches
are padded on the left.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import LlavaConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..anyres import image_tokens
from ..kv_cache import left_pad
from .hub import in_folder, read_json
from .images import ImageProcessor, load_image

IMAGE = "<image>"  # the placeholder users write, and llava-hf's added token
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
NEXT_SYSTEM = VICUNA_SYSTEM.replace("user", "human")  # llava-hf/llava-v1.6-vicuna-*-hf
TEMPLATES = {  # {question} already starts with "<image>\n" when the user did not place it
    "llava": "USER: {question} ASSISTANT:",  # llava-hf/llava-1.5-*-hf model cards
    "vicuna_v1": VICUNA_SYSTEM + " USER: {question} ASSISTANT:",  # original LLaVA-1.5 eval
    "vicuna_next": NEXT_SYSTEM + " USER: {question} ASSISTANT:",  # llava-v1.6-vicuna-*-hf
    "mistral_instruct": "[INST] {question} [/INST]",  # llava-hf/llava-v1.6-mistral-7b-hf
    "chatml": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
               "{question}<|im_end|><|im_start|>assistant\n"),  # llava-hf/llava-v1.6-34b-hf
    "raw": "{question}",
}


@dataclass
class Processor:
    """Prompt templates, tokenization with `<image>` expansion, batching, decoding."""
    cfg: LlavaConfig
    tokenizer: object | None  # a tokenizers.Tokenizer
    image: ImageProcessor = field(default_factory=ImageProcessor)
    template: str = "llava"
    pad_id: int | None = None
    tokenizer_hint: str = ""  # why there is no tokenizer, and what to pass instead

    @classmethod
    def from_dir(cls, cfg: LlavaConfig, root: Path, image_root: Path | None = None,
                 template: str = "llava", pad_to_square: bool = False):
        """From the checkpoint's `tokenizer.json` and `preprocessor_config.json` (if present)."""
        from tokenizers import Tokenizer
        image_root = root if image_root is None else image_root
        pre = in_folder(image_root, "preprocessor_config.json")
        d = read_json(pre) if pre.is_file() else {}
        try:
            image = ImageProcessor.from_dict(d, cfg.vision.image_size,
                                             pad_to_square or d.get("image_aspect_ratio") == "pad")
        except ConfigError as e:
            raise CheckpointError(f"{pre}: {e}") from None
        tok, hint = None, ""
        if (path := in_folder(root, "tokenizer.json")).is_file():
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as e:  # the tokenizers library raises a bare Exception
                raise CheckpointError(f"{path} is not a tokenizer the tokenizers library can "
                                      f"read: {e}") from None
            other = tok.id_to_token(cfg.image_token_id) if cfg.image_token_id >= 0 else None
            if other not in (None, IMAGE):  # text with that token would be read as an image
                raise CheckpointError(f"config.json's image_token_id {cfg.image_token_id} is "
                                      f"{other!r} in {path}, not {IMAGE}; they must agree")
        else:
            hint = (f"{root} has no tokenizer.json (a sentencepiece tokenizer.model cannot be "
                    "read by the tokenizers library); pass tokenizer= a repo or directory with "
                    "the same vocabulary, e.g. 'llava-hf/llava-1.5-7b-hf' for LLaVA-1.5")
        return cls(cfg, tok, image, template, tokenizer_hint=hint)

    def _tok(self):
        if self.tokenizer is None:
            raise InputError(self.tokenizer_hint or "this processor has no tokenizer")
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        for tid in (self.pad_id, self.tokenizer and self.tokenizer.token_to_id("<pad>"),
                    self.cfg.text.pad_token_id):
            if tid is not None:
                return tid
        return 0  # any id: padded slots are masked out

    def format(self, question: str, template: str | None = None) -> str:
        """The chat prompt for one question; `<image>\\n` goes first unless placed already."""
        name = self.template if template is None else template
        if name not in TEMPLATES:
            raise InputError(f"unknown template {name!r}; choose from {sorted(TEMPLATES)}")
        if not isinstance(question, str):
            raise InputError(f"a question is a string, not {type(question).__name__}")
        if IMAGE not in question:
            question = f"{IMAGE}\n{question}"
        return TEMPLATES[name].format(question=question)

    def encode(self, text: str, counts=None) -> list[int]:
        """Token ids of one prompt, the k-th `<image>` expanded to counts[k] image ids
        (default: `image_seq_length` each; LLaVA-NeXT's depend on each image's size)."""
        tok, img = self._tok(), self.cfg.image_token_id
        counts = iter(counts or [self.cfg.image_seq_length] * text.count(IMAGE))
        vocab_id = tok.token_to_id(IMAGE)
        if vocab_id is not None:  # llava-hf: <image> is an added token of the vocabulary
            ids = []
            for t in tok.encode(text).ids:
                ids += [img] * next(counts) if t == vocab_id else [t]
            return ids
        chunks = text.split(IMAGE)  # original LLaVA: tokenize around the placeholders
        ids = tok.encode(chunks[0]).ids
        for chunk in chunks[1:]:
            ids += [img] * next(counts) + tok.encode(chunk, add_special_tokens=False).ids
        return ids

    def __call__(self, prompts, images=None) -> dict[str, torch.Tensor]:
        """Prompts (str or list) with `<image>` placeholders and their images, in order ->
        input_ids (B, T), attention_mask (B, T), pixel_values (I, 3, H, W) or None; for
        LLaVA-NeXT pixel_values (I, tiles, 3, H, W), zero-padded, and image_sizes (I, 2)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(
                isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a string or a non-empty list of strings, got "
                             f"{prompts!r:.80}")
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple))
                                             else [images])
        counts = [p.count(IMAGE) for p in prompts]
        if sum(counts) != len(images):
            which = ", ".join(f"prompt {i}: {c}" for i, c in enumerate(counts))
            raise InputError(f"the prompts hold {sum(counts)} {IMAGE} placeholder(s) ({which}) "
                             f"but {len(images)} image(s) were given; write one {IMAGE} where "
                             "each image goes (Processor.format does this for one image)")
        out, sizes = {}, None
        if images and self.cfg.image_grid_pinpoints:  # LLaVA-NeXT: tiles, counts by size
            decoded = [load_image(im) for im in images]
            sizes = [(im.size[1], im.size[0]) for im in decoded]  # (height, width)
            crops = [self.image.anyres(im, self.cfg.image_grid_pinpoints) for im in decoded]
            P = max(len(c) for c in crops)  # zero tiles after an image's own, as transformers
            out["pixel_values"] = torch.stack([torch.cat([c, c.new_zeros(P - len(c), *c.shape[1:])])
                                               for c in crops])
            out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        elif images:
            out["pixel_values"] = self.image(images)
        tokens = [image_tokens(self.cfg, *s) for s in sizes] if sizes else None
        rows, k = [], 0
        for p, c in zip(prompts, counts):
            rows.append(self.encode(p, tokens[k:k + c] if tokens else None))
            k += c
        context = self.cfg.text.max_position_embeddings
        for i, r in enumerate(rows):
            if len(r) > context:
                raise InputError(f"prompt {i} is {len(r)} tokens ({counts[i]} image(s)) but the "
                                 f"model's context is {context}; shorten it")
        ids, mask = left_pad([torch.tensor(r, dtype=torch.long) for r in rows], self.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask.long(),
                "pixel_values": out.get("pixel_values"), **({"image_sizes": out["image_sizes"]}
                                                            if sizes else {})}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        ids = [i for i in ids if i >= 0]  # image placeholders such as -200 are not text
        return self._tok().decode(ids, skip_special_tokens=skip_special_tokens)

    def files(self) -> dict[str, str]:
        """The processor's files of a checkpoint, by name: tokenizer.json and
        tokenizer_config.json (with a tokenizer) and preprocessor_config.json."""
        image = self.image.to_dict()
        if self.cfg.image_grid_pinpoints:  # transformers reads it as LLaVA-NeXT's processor
            image.update(image_processor_type="LlavaNextImageProcessor", do_pad=True,
                         image_grid_pinpoints=[list(p) for p in self.cfg.image_grid_pinpoints])
        out = {"preprocessor_config.json": json.dumps(image, indent=2)}
        if self.tokenizer is not None:
            out["tokenizer.json"] = self.tokenizer.to_str(pretty=True)
            t = self.cfg.text
            ids = {"bos_token": t.bos_token_id, "eos_token": (t.eos_ids or (None,))[0],
                   "pad_token": self.tokenizer.token_to_id("<pad>")}
            special = {role: self.tokenizer.id_to_token(i) for role, i in ids.items()
                       if i is not None and self.tokenizer.id_to_token(i) is not None}
            out["tokenizer_config.json"] = json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", **special}, indent=2)
        return out
