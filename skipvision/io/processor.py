"""Images and questions in, model inputs out; generated ids back to text.

Image preprocessing is the CLIP image processor's, as llava-hf checkpoints expect it (their
preprocessor_config.json): any PIL mode to RGB (transparency composited onto white), shortest edge resized
with bicubic, centre crop, rescale by 1/255, normalise with the CLIP mean and std. Original
LLaVA-1.5 (`image_aspect_ratio "pad"`) first pads the image to a square with the mean colour,
image centred. Text goes through the `tokenizers` library from `tokenizer.json`; each `<image>`
placeholder becomes `cfg.image_seq_length` image tokens of id `cfg.image_token_id` (a vocab id
for llava-hf, the sentinel -200 for original LLaVA). Batches are padded on the left.
"""
from __future__ import annotations

import io
import json
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import LlavaConfig
from ..kv_cache import left_pad

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (llava-hf preprocessor_config.json)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE = "<image>"  # the placeholder users write, and llava-hf's added token
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = {  # {question} already starts with "<image>\n" when the user did not place it
    "llava": "USER: {question} ASSISTANT:",  # llava-hf/llava-1.5-*-hf model cards
    "vicuna_v1": VICUNA_SYSTEM + " USER: {question} ASSISTANT:",  # original LLaVA-1.5 eval
    "raw": "{question}",
}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb guard (~89 Mpx)
MAX_DOWNLOAD = 64 << 20  # bytes read from an image URL at most


class InputError(ValueError):
    """A bad image or prompt; the message says what is wrong and how to fix it."""


def load_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded PIL image from a path, URL, bytes or PIL image; clear errors otherwise."""
    if isinstance(source, Image.Image):
        return source
    name = repr(str(source)) if not isinstance(source, bytes) else "<bytes>"
    if isinstance(source, bytes):
        data = source
    elif str(source).startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(str(source), timeout=30) as r:
                data = r.read(MAX_DOWNLOAD + 1)
        except OSError as e:
            raise InputError(f"cannot download image {name}: {e}") from None
        if len(data) > MAX_DOWNLOAD:
            raise InputError(f"image {name} is larger than {MAX_DOWNLOAD >> 20} MiB")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputError(f"image {name} does not exist or is not a file")
        data = path.read_bytes()
    if not data:
        raise InputError(f"image {name} is empty (0 bytes)")
    too_large = (f"image {name} is too large to decode safely ({{}} pixels, limit "
                 f"{max_pixels}); downscale it, or pass a larger max_pixels if you trust it")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own guard, at twice its limit
        raise InputError(too_large.format(e)) from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{name} is not an image PIL can read (unknown format)") from None
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(too_large.format(f"{w}x{h}"))
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image {name} is truncated or corrupt: {e}") from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any PIL mode; transparent pixels are composited onto white."""
    if im.mode == "RGB":
        return im
    if "A" in im.getbands() or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def pad_to_square(im: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Original LLaVA-1.5's `expand2square`: a max(w, h) square of `color`, image centred."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), color)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


@dataclass(frozen=True)
class ImageProcessor:
    """CLIP preprocessing (fields as in `preprocessor_config.json`), optionally pad-to-square."""
    size: int = 336  # shortest edge after resize
    crop: tuple[int, int] = (336, 336)  # (height, width)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    pad_to_square: bool = False  # original LLaVA `image_aspect_ratio "pad"`

    @classmethod
    def from_dict(cls, d: dict, image_size: int, pad_to_square: bool = False):
        """From a `preprocessor_config.json` dict (old int or new dict sizes); {} = defaults."""
        size, crop = d.get("size", image_size), d.get("crop_size", image_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height"))
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        kw = {k: d[k] for k in ("rescale_factor", "resample", "do_resize", "do_center_crop",
                                "do_rescale", "do_normalize") if d.get(k) is not None}
        return cls(size=int(size), crop=tuple(int(c) for c in crop),
                   mean=tuple(d.get("image_mean", CLIP_MEAN)),
                   std=tuple(d.get("image_std", CLIP_STD)), pad_to_square=pad_to_square, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(image_processor_type="CLIPImageProcessor", size={"shortest_edge": self.size},
                 crop_size={"height": self.crop[0], "width": self.crop[1]},
                 image_mean=list(self.mean), image_std=list(self.std), do_convert_rgb=True)
        for k in ("crop", "mean", "std"):
            del d[k]
        if d.pop("pad_to_square"):
            d["image_aspect_ratio"] = "pad"
        return d

    @property
    def pad_color(self) -> tuple[int, ...]:
        return tuple(int(m * 255) for m in self.mean)  # (122, 116, 104) for CLIP's mean

    def one(self, im: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, crop_h, crop_w) float32."""
        im = to_rgb(im)
        if self.pad_to_square:
            im = pad_to_square(im, self.pad_color)
        if self.do_resize:
            w, h = im.size
            if w <= h:  # the shorter edge becomes `size`, the other keeps the aspect ratio
                im = im.resize((self.size, int(self.size * h / w)), Image.Resampling(self.resample))
            else:
                im = im.resize((int(self.size * w / h), self.size), Image.Resampling(self.resample))
        x = np.asarray(im, dtype=np.float64)  # (H, W, 3)
        if self.do_center_crop:
            (H, W), (ch, cw) = x.shape[:2], self.crop
            if ch > H or cw > W:
                raise InputError(f"image is {W}x{H} after resizing, smaller than the crop {cw}x{ch}")
            top, left = (H - ch) // 2, (W - cw) // 2
            x = x[top:top + ch, left:left + cw]
        if self.do_rescale:
            x = x * self.rescale_factor
        if self.do_normalize:
            x = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))

    def __call__(self, images) -> torch.Tensor:
        """A list of images (PIL, path, URL or bytes) -> (I, 3, H, W) float32."""
        return torch.stack([self.one(load_image(im)) for im in images])


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
        pre = image_root / "preprocessor_config.json"
        d = json.loads(pre.read_text()) if pre.is_file() else {}
        image = ImageProcessor.from_dict(d, cfg.vision.image_size,
                                         pad_to_square or d.get("image_aspect_ratio") == "pad")
        tok, hint = None, ""
        if (root / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(root / "tokenizer.json"))
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
        if IMAGE not in question:
            question = f"{IMAGE}\n{question}"
        return TEMPLATES[name].format(question=question)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, each `<image>` expanded to `image_seq_length` image ids."""
        tok, n, img = self._tok(), self.cfg.image_seq_length, self.cfg.image_token_id
        vocab_id = tok.token_to_id(IMAGE)
        if vocab_id is not None:  # llava-hf: <image> is an added token of the vocabulary
            ids = []
            for t in tok.encode(text).ids:
                ids += [img] * n if t == vocab_id else [t]
            return ids
        chunks = text.split(IMAGE)  # original LLaVA: tokenize around the placeholders
        ids = tok.encode(chunks[0]).ids
        for chunk in chunks[1:]:
            ids += [img] * n + tok.encode(chunk, add_special_tokens=False).ids
        return ids

    def __call__(self, prompts, images=None) -> dict[str, torch.Tensor]:
        """Prompts (str or list) with `<image>` placeholders and their images, in order ->
        input_ids (B, T), attention_mask (B, T), pixel_values (I, 3, H, W) or None.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple))
                                             else [images])
        counts = [p.count(IMAGE) for p in prompts]
        if sum(counts) != len(images):
            which = ", ".join(f"prompt {i}: {c}" for i, c in enumerate(counts))
            raise InputError(f"the prompts hold {sum(counts)} {IMAGE} placeholder(s) ({which}) "
                             f"but {len(images)} image(s) were given; write one {IMAGE} where "
                             "each image goes (Processor.format does this for one image)")
        rows = [self.encode(p) for p in prompts]
        context = self.cfg.text.max_position_embeddings
        for i, r in enumerate(rows):
            if len(r) > context:
                raise InputError(f"prompt {i} is {len(r)} tokens ({counts[i]} image(s) of "
                                 f"{self.cfg.image_seq_length} tokens) but the model's context "
                                 f"is {context}; shorten it")
        ids, mask = left_pad([torch.tensor(r, dtype=torch.long) for r in rows], self.pad_token_id)
        pixels = self.image(images) if images else None
        return {"input_ids": ids, "attention_mask": mask.long(), "pixel_values": pixels}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        ids = [i for i in ids if i >= 0]  # image placeholders such as -200 are not text
        return self._tok().decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: Path):
        """tokenizer.json (+ tokenizer_config.json) and preprocessor_config.json."""
        directory = Path(directory)
        if self.tokenizer is not None:
            self.tokenizer.save(str(directory / "tokenizer.json"))
            t = self.cfg.text
            ids = {"bos_token": t.bos_token_id, "eos_token": (t.eos_ids or (None,))[0],
                   "pad_token": self.tokenizer.token_to_id("<pad>")}
            special = {role: self.tokenizer.id_to_token(i) for role, i in ids.items()
                       if i is not None and self.tokenizer.id_to_token(i) is not None}
            (directory / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", **special}, indent=2))
        (directory / "preprocessor_config.json").write_text(json.dumps(self.image.to_dict(),
                                                                       indent=2))
