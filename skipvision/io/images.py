"""Images in, pixel values out: decoding with bounds, RGB, and CLIP preprocessing.

Preprocessing is the CLIP image processor's, as llava-hf checkpoints expect it (their
preprocessor_config.json): any PIL mode to RGB (transparency composited onto white), shortest
edge resized with bicubic, centre crop, rescale by 1/255, normalise with the CLIP mean and std.
Original LLaVA-1.5 (`image_aspect_ratio "pad"`) first pads the image to a square with the mean
colour, image centred. Every size is checked before pixels are allocated: the decoded image
against PIL's decompression-bomb bound, the padded and resized one against MAX_RESIZED.
"""
from __future__ import annotations

import io
import math
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..anyres import best_resolution
from ..errors import ConfigError, InputError, check_fields

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (llava-hf preprocessor_config.json)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb guard (~89 Mpx), decoded
MAX_RESIZED = 1 << 25  # pixels of the resized (or padded) image before its crop: 100 MB as RGB
MAX_DOWNLOAD = 64 << 20  # bytes read from an image URL at most


def load_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded PIL image from a path, URL, bytes or PIL image; clear errors otherwise."""
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, bytes, Path)):
        raise InputError(f"an image is a path, URL, bytes or PIL image, not {type(source).__name__}")
    name = repr(str(source)) if not isinstance(source, bytes) else "<bytes>"
    if isinstance(source, bytes):
        data = source
    elif str(source).startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(str(source), timeout=30) as r:
                data = r.read(MAX_DOWNLOAD + 1)
        except (OSError, ValueError) as e:
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
    except Exception as e:  # PIL raises many types for a file it cannot parse
        raise InputError(f"{name} is not an image PIL can read ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > max_pixels or min(w, h) < 1:
        raise InputError(too_large.format(f"{w}x{h}"))
    try:
        im.load()
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, ValueError, ...
        raise InputError(f"image {name} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any PIL mode; transparent pixels are composited onto white."""
    if im.mode == "RGB":
        return im
    try:
        if "A" in im.getbands() or "transparency" in im.info:
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:
        raise InputError(f"an image in mode {im.mode!r} cannot be converted to RGB ({e})") from None


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

    def __post_init__(self):
        flags = {k: ("bool", ()) for k in ("do_resize", "do_center_crop", "do_rescale",
                                            "do_normalize", "pad_to_square")}
        check_fields(self, "preprocessor_config.", dict(
            size=("int", (1, 1 << 14)), rescale_factor=("num", (1e-9, 1e9)),
            resample=("int", (0, 5)), **flags))  # PIL's six resampling filters
        for name, lo in (("crop", 1), ("mean", -1e9), ("std", 1e-9)):
            v = getattr(self, name)
            want = 2 if name == "crop" else 3
            kinds = (int,) if name == "crop" else (int, float)
            ok = isinstance(v, (tuple, list)) and len(v) == want and all(
                isinstance(x, kinds) and not isinstance(x, bool) and lo <= x <= 1e9 for x in v)
            if not ok:
                key = {"crop": "crop_size", "mean": "image_mean", "std": "image_std"}[name]
                raise ConfigError(f"preprocessor_config.{key} must be {want} numbers >= {lo} "
                                  f"(one per {'side' if want == 2 else 'colour'}), got {v!r}")
            object.__setattr__(self, name, tuple(x if name == "crop" else float(x) for x in v))
        if self.do_resize and self.do_center_crop and min(self.crop) > self.size:
            raise ConfigError(f"preprocessor_config.crop_size {list(self.crop)} is larger than "
                              f"size {self.size}: no resized image could be cropped")

    @classmethod
    def from_dict(cls, d: dict, image_size: int, pad_to_square: bool = False):
        """From a `preprocessor_config.json` dict (old int or new dict sizes); {} = defaults."""
        size, crop = d.get("size", image_size), d.get("crop_size", image_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height"))
        crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        kw = {k: d[k] for k in ("rescale_factor", "resample", "do_resize", "do_center_crop",
                                "do_rescale", "do_normalize") if k in d}  # null is not missing
        return cls(size=size, crop=crop, mean=d.get("image_mean", CLIP_MEAN),
                   std=d.get("image_std", CLIP_STD), pad_to_square=pad_to_square, **kw)

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

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after padding and resizing an image of w x h, checked against the
        memory bounds and the crop before any pixel is touched."""
        if self.pad_to_square:
            if max(w, h) ** 2 > MAX_PIXELS:
                raise InputError(f"a {w}x{h} image padded to a square would be over "
                                 f"{MAX_PIXELS} pixels (aspect ratio too extreme); crop it first")
            w = h = max(w, h)
        if self.do_resize:  # the shorter edge becomes `size`, the other keeps the aspect ratio
            w, h = ((self.size, int(self.size * h / w)) if w <= h else
                    (int(self.size * w / h), self.size))
            if w * h > MAX_RESIZED:
                raise InputError(f"the image would be {w}x{h} pixels after resizing, over the "
                                 f"limit of {MAX_RESIZED} (aspect ratio too extreme); crop it first")
        if self.do_center_crop and (self.crop[0] > h or self.crop[1] > w):
            raise InputError(f"image is {w}x{h} after resizing, smaller than the crop "
                             f"{self.crop[1]}x{self.crop[0]} (preprocessor crop_size)")
        return w, h

    def one(self, im: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, crop_h, crop_w) float32."""
        W, H = self.resized_size(*im.size)
        im = to_rgb(im)
        if self.pad_to_square:
            im = pad_to_square(im, self.pad_color)
        if self.do_resize:
            im = im.resize((W, H), Image.Resampling(self.resample))
        x = np.asarray(im)  # (H, W, 3) uint8
        if self.do_center_crop:
            (ch, cw), top, left = self.crop, (H - self.crop[0]) // 2, (W - self.crop[1]) // 2
            x = x[top:top + ch, left:left + cw]
        x = x.astype(np.float64)
        if self.do_rescale:
            x = x * self.rescale_factor
        if self.do_normalize:
            x = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))

    def __call__(self, images) -> torch.Tensor:
        """A list of images (PIL, path, URL or bytes) -> (I, 3, H, W) float32."""
        return torch.stack([self.one(load_image(im)) for im in images])

    def anyres(self, im: Image.Image, pinpoints) -> torch.Tensor:
        """LLaVA-NeXT (anyres.py): (1 + tiles, 3, S, S) for one image, S the crop size: the
        image squashed to S x S, then the tiles of the image fitted (aspect ratio kept) and
        zero-padded, centred, into the best of `pinpoints`, row by row."""
        im, S = to_rgb(im), self.crop[0]
        (w, h), resample = im.size, Image.Resampling(self.resample)
        H, W = best_resolution(h, w, pinpoints)
        fh, fw = (min(math.ceil(h * (W / w)), H), W) if W / w < H / h else (
            H, min(math.ceil(w * (H / h)), W))
        canvas = Image.new("RGB", (W, H))  # zeros: black
        canvas.paste(im.resize((fw, fh), resample), ((W - fw) // 2, (H - fh) // 2))
        tiles = [canvas.crop((x, y, x + S, y + S)) for y in range(0, H, S) for x in range(0, W, S)]
        base = im.resize((self.size, self.size), resample)
        return torch.stack([self.one(t) for t in [base] + tiles])
