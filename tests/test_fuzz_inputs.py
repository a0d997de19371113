"""Fuzz what a user hands the model: images (sizes, modes, formats, truncations, forged
headers), prompts and generation settings, and SkipConfig fields. Each case runs in a
sandbox (time and memory limited); it succeeds and equals its reference, or it raises one of
skipvision's errors naming what is wrong."""
import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

from fuzz_support import expect, fuzz, tiny_model64
from helpers import MODES, hf_image_processor, make_image
from reference import dense
from sandbox import Sandbox
from skipvision import SkipConfig, generate
from skipvision.errors import ConfigError, SkipvisionError
from skipvision.io.images import ImageProcessor

pytestmark = pytest.mark.fuzz


# ------------------------------------------------------------ images
def forged_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h, with one row of data: decoding must not trust it."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1))) + chunk(b"IEND", b""))


def image_case(data: bytes, size: int, pad: bool):
    try:
        return ("loaded", ImageProcessor(size, (size, size), pad_to_square=pad)([data]))
    except SkipvisionError as e:
        return ("refused", type(e).__name__, str(e))


def hf_image_case(data: bytes, size: int, pad: bool):
    """The reference: transformers' CLIP processor (after the same pad-to-square)."""
    from skipvision.io.images import pad_to_square, to_rgb
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        if pad:
            im = pad_to_square(to_rgb(im), ImageProcessor().pad_color)
        return ("loaded", hf_image_processor(size)(images=[im], return_tensors="pt")["pixel_values"])
    except Exception as e:  # noqa: BLE001
        return ("refused", f"{type(e).__name__}: {e}")


images = st.one_of(  # ordinary sizes, and extreme aspect ratios (the forged ones: x 1000)
    st.tuples(st.sampled_from(MODES), st.integers(1, 120), st.integers(1, 120)),
    st.tuples(st.sampled_from(["L", "RGB"]), st.integers(1, 3), st.integers(1000, 30_000)),
    st.tuples(st.sampled_from(["RGB", "RGBA"]), st.integers(1000, 30_000), st.integers(1, 3)))


@fuzz(300)
@given(shape=images, fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "forged"]),
       cut=st.one_of(st.none(), st.floats(0, 1)), size=st.sampled_from([8, 33, 96]),
       pad=st.booleans(), seed=st.integers(0, 2**16))
def test_images_of_drawn_sizes_modes_formats_and_truncations(box, shape, fmt, cut, size, pad,
                                                             seed):
    mode, w, h = shape
    if fmt == "forged":
        data = forged_png(w * 1000 if w > 500 else w, h * 1000 if h > 500 else h)
    else:
        im = make_image(mode, w, h, seed)
        try:
            buf = io.BytesIO()
            im.save(buf, fmt)
        except Exception:  # noqa: BLE001 - this format cannot store this mode or size
            buf = io.BytesIO()
            im.save(buf, "TIFF")  # TIFF stores every mode
        data = buf.getvalue()
    if cut is not None:
        data = data[:int(len(data) * cut)]
    got = expect("images", box(image_case, data, size, pad), ["image", "<bytes>"])
    if got[0] == "loaded":
        want = box(hf_image_case, data, size, pad).value
        assert want[0] == "loaded", f"we read an image transformers cannot: {want[1]}"
        assert (got[1] - want[1]).abs().max() <= 1e-5


# ------------------------------------------------------------ prompts and generation
def generate_case(ids, mask, px, settings: dict, skip):
    model = tiny_model64()
    try:
        out = generate(model, ids, px, mask, eos_ids=[], skip=skip, **settings)
    except SkipvisionError as e:
        return ("refused", type(e).__name__, str(e))
    want = None
    if settings.get("temperature", 0) == 0 and out.tokens.shape[1]:
        with torch.no_grad():
            want = dense.naive_generate(model, ids, px, mask.bool(), out.tokens.shape[1], skip)
    return ("generated", out.tokens, want)


token = st.one_of(st.integers(0, 399), st.integers(0, 399), st.integers(0, 399),
                  st.sampled_from([400, 401, -200, -1, 402, 10**6, 2**40]))
rows = st.lists(st.lists(token, max_size=6), min_size=1, max_size=3)
maybe = lambda *bad: st.sampled_from([None] * 4 + list(bad))  # noqa: E731  mostly unset


@fuzz(400)
@given(rows=rows, images=st.lists(st.integers(0, 2), min_size=3, max_size=3),
       layout=st.sampled_from(["left"] * 4 + ["right", "holes", "empty"]),
       n_px=st.sampled_from([0, 0, 0, -1, 1]),
       px_kind=st.sampled_from(["ok"] * 4 + ["nan", "3d", "int", "size"]),
       new=st.sampled_from([1, 4, 4, 4, -3, 0, 100, 2.5, None]),
       temp=maybe(0, 0.7, 1, -1, math.nan, math.inf, "1", True),
       top_k=maybe(1, 5, 0, -2, 2.5, True), top_p=maybe(0.9, 1, 0, 1.5, math.nan),
       use_skip=st.booleans(), seed=st.integers(0, 2**16))
def test_prompts_token_ids_lengths_and_generation_settings(box, rows, images, layout, n_px,
                                                           px_kind, new, temp, top_k, top_p,
                                                           use_skip, seed):
    image_id, n = 400, 4  # the tiny model's <image> id and tokens per image
    seqs = [r[:2] + [image_id] * n * k + r[2:] for r, k in zip(rows, images)]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        if layout == "empty":  # no real token at all
            continue
        at = {"left": T - len(s), "right": 0, "holes": 0}[layout]
        ids[b, at:at + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, at:at + len(s)] = 1
        if layout == "holes" and len(s) > 2:
            mask[b, 1] = 0
    n_img = max(0, sum(images[:len(seqs)]) + n_px)
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n_img, 3, 8, 8, generator=g, dtype=torch.float64) if n_img else None
    if px is not None and px_kind != "ok":
        px = {"nan": px.masked_fill(px > 1, math.nan), "3d": px[0], "int": px.long(),
              "size": torch.randn(n_img, 3, 9, 8, dtype=torch.float64)}[px_kind]
    settings = {k: v for k, v in dict(max_new_tokens=new, temperature=temp, top_k=top_k,
                                      top_p=top_p).items() if v is not None}
    skip = SkipConfig(retained=2, skipped=1) if use_skip else None
    got = expect("prompts and generation", box(generate_case, ids, mask, px, settings, skip),
                 ["input_ids", "attention_mask", "pixel_values", "padded", "image", "prompt",
                  "max_new_tokens", "temperature", "top_k", "top_p", "context"])
    if got[0] == "generated" and got[2] is not None:
        assert torch.equal(got[1], got[2]), "greedy tokens differ from the no-cache oracle"


# ------------------------------------------------------------ SkipConfig fields
BAD = [-1, 1.5, None, "2", [], [1.5], [-1], [True], math.nan, "bogus", True]
FIELDS = {  # valid values (twice, so that half the draws are valid) and hostile ones
    "summary": [True, False] * 2 + [0, 1, None, "yes"], "mask": ["causal", "consistent"] * 2,
    "kv": ["evict", "keep"] * 2, "layers": [None, [0], (0,), [0, 0]] * 2,
    "merge_order": ["redundancy", "spatial"] * 2, "retain": ["cls_attention"] * 4}


def skip_case(kw: dict):
    model = tiny_model64()
    try:
        skip = SkipConfig(**kw)
        g = torch.Generator().manual_seed(0)
        ids = torch.tensor([[1, 7] + [400] * 4 + [9, 11]])
        px = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
        with torch.no_grad():
            got = model(ids, px, skip=skip)[0]
    except ConfigError as e:
        return ("refused", type(e).__name__, str(e))
    with torch.no_grad():
        want, _ = dense.logits(model, ids, px, torch.ones_like(ids), skip)
    return ("ran", skip, got, want[0])


@fuzz(400)
@given(kw=st.fixed_dictionaries({}, optional={
    "retained": st.sampled_from([0, 1, 2, 2, 3, 5] + BAD),
    "skipped": st.sampled_from([0, 1, 1, 2, 3, 5] + BAD),
    **{k: st.sampled_from(v + BAD[:4]) for k, v in FIELDS.items()}}))
def test_skip_config_fields(box, kw):
    kw = dict(retained=2, skipped=1) | kw  # the tiny model has 4 image tokens
    got = expect("SkipConfig fields", box(skip_case, kw), ["SkipConfig.", "retained",
                                                            "skipped", "layers"])
    if got[0] == "ran":
        skip = got[1]
        for k, v in kw.items():  # what was asked is what is used
            list_ = k == "layers" and v is not None
            assert getattr(skip, k) == (tuple(sorted(set(v))) if list_ else v)
            assert type(getattr(skip, k)) is (tuple if list_ else type(v))
        assert torch.allclose(got[2], got[3], rtol=0, atol=1e-12), "differs from the oracle"


def test_the_sandbox_reports_a_hang_and_a_blow_up():
    """What the suites rely on: a case past the time or memory limit fails, it is not
    suffered by the test run."""
    sandbox = Sandbox(memory=256 << 20, seconds=2)
    try:
        assert sandbox(_sleep).kind == "timeout"
        assert sandbox(_allocate).error in ("MemoryError", "RuntimeError")
        assert sandbox(_allocate, 1 << 20).kind == "ok"
    finally:
        sandbox.close()


def _sleep():
    import time
    time.sleep(10)


def _allocate(n: int = 1 << 30):
    return np.ones(n, dtype=np.uint8).sum()
