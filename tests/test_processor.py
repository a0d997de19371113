"""The processor equals transformers' CLIP image processor and LlavaProcessor; bad input says why."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from PIL import Image

from reference.pad_square import expand_to_square
from skipvision import LlavaConfig, Processor, TextConfig, VisionConfig
from skipvision.errors import InputError
from skipvision.io.images import ImageProcessor, load_image, pad_to_square
from skipvision.io.processor import TEMPLATES, VICUNA_SYSTEM
from helpers import MODES, hf_image_processor, make_image
from tiny_tokenizer import as_transformers, tiny_tokenizer

@settings(max_examples=40)
@given(mode=st.sampled_from(MODES), w=st.integers(1, 300), h=st.integers(1, 300),
       aspect=st.sampled_from([None, 1 / 7, 5.0]), size=st.sampled_from([7, 16, 33, 336]),
       seed=st.integers(0, 2**16))
@example(mode="RGBA", w=640, h=480, aspect=None, size=336, seed=1)  # a photo, LLaVA's size
@example(mode="I;16", w=400, h=300, aspect=None, size=336, seed=2)
@example(mode="CMYK", w=333, h=100, aspect=None, size=336, seed=3)
@example(mode="P+transparency", w=5, h=700, aspect=None, size=33, seed=4)
@example(mode="L", w=336, h=336, aspect=None, size=336, seed=5)  # no resize, no crop
def test_pixels_equal_transformers_clip_processor(mode, w, h, aspect, size, seed):
    if aspect is not None:  # very wide / tall images as well
        h = max(1, min(900, round(w * aspect)))
    im = make_image(mode, w, h, seed)
    want = hf_image_processor(size)(images=[im], return_tensors="pt")["pixel_values"]
    got = ImageProcessor(size=size, crop=(size, size))([im])
    assert got.shape == want.shape == (1, 3, size, size)
    assert (got - want).abs().max().item() <= 1e-5


@settings(max_examples=20)
@given(w=st.integers(1, 40), h=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pad_to_square_is_the_original_llava_rule(w, h, seed):
    im = make_image("RGB", w, h, seed)
    color = ImageProcessor().pad_color
    assert color == (122, 116, 104)  # original LLaVA: tuple(int(x * 255) for x in CLIP mean)
    want = np.array(expand_to_square(np.asarray(im).tolist(), color), dtype=np.uint8)
    assert np.array_equal(np.asarray(pad_to_square(im, color)), want)
    size = 16  # the whole pipeline: pad, then the CLIP processor
    hf = hf_image_processor(size)(images=[Image.fromarray(want)], return_tensors="pt")
    got = ImageProcessor(size=size, crop=(size, size), pad_to_square=True)([im])
    assert (got - hf["pixel_values"]).abs().max().item() <= 1e-5


TOK = tiny_tokenizer()
TEXT = st.lists(st.sampled_from(list("abcdefghij ?.,:\n\tXYZéü猫") + ["the ", "image", "USER: "]),
                max_size=20).map("".join)


def processors(patch=4, size=8, context=4096):
    """Ours and transformers' LlavaProcessor on the same tokenizer and geometry."""
    from transformers import LlavaProcessor
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=8, num_attention_heads=2, image_size=size,
                                          patch_size=patch),
                      text=TextConfig(vocab_size=TOK.get_vocab_size(), hidden_size=8,
                                      num_attention_heads=2, max_position_embeddings=context),
                      image_token_id=TOK.token_to_id("<image>"))
    ours = Processor(cfg, TOK, ImageProcessor(size=size, crop=(size, size)))
    hf_tok = as_transformers(TOK)
    hf_tok.padding_side = "left"
    theirs = LlavaProcessor(image_processor=hf_image_processor(size), tokenizer=hf_tok,
                            patch_size=patch, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1)
    return ours, theirs


@settings(max_examples=30)
@given(texts=st.lists(st.tuples(TEXT, TEXT, st.booleans()), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_input_ids_equal_llava_processor(texts, seed):
    """One or two <image> per prompt at drawn places; a batch is left-padded like theirs."""
    ours, theirs = processors()
    prompts = [f"{a}<image>{b}" + ("<image>" if two else "") for a, b, two in texts]
    images = [make_image("RGB", 9 + i, 12, seed + i) for i in range(sum(p.count("<image>")
                                                                        for p in prompts))]
    got = ours(prompts, images)
    want = theirs(text=prompts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert (got["pixel_values"] - want["pixel_values"]).abs().max() <= 1e-5
    assert ours.cfg.image_seq_length == 4  # (8 / 4)^2 patches, CLS dropped


@settings(max_examples=20)
@given(text=TEXT)
def test_decode_equals_transformers(text):
    ours, theirs = processors()
    ids = ours.encode(text)
    assert ours.decode(ids) == theirs.tokenizer.decode(ids, skip_special_tokens=True)


def test_templates():
    ours, _ = processors()
    assert ours.format("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert ours.format("Left <image> right", "llava") == "USER: Left <image> right ASSISTANT:"
    assert ours.format("Hi", "vicuna_v1") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\nHi "
        "ASSISTANT:")
    assert TEMPLATES["vicuna_v1"].startswith(VICUNA_SYSTEM + " USER: ")
    with pytest.raises(InputError, match="unknown template 'alpaca'"):
        ours.format("Hi", "alpaca")


def test_sentinel_placeholders_without_an_image_token_in_the_vocabulary():
    """Original LLaVA: the tokenizer has no <image>; text around it is tokenized in pieces and
    the sentinel -200 inserted, once per image feature."""
    ours, _ = processors()
    plain = tiny_tokenizer(added=("<pad>",))
    sp = Processor(ours.cfg.replace(image_token_id=-200), plain, ours.image)
    ids = sp.encode("USER: <image>\nHi ASSISTANT:")
    before = plain.encode("USER: ").ids
    after = plain.encode("\nHi ASSISTANT:", add_special_tokens=False).ids
    assert ids == before + [-200] * 4 + after and before[0] == plain.token_to_id("<s>")


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_bad_images_say_what_is_wrong(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    buf = io.BytesIO()
    make_image("RGB", 64, 64, 0).save(buf, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png(100_000, 100_000))
    for source, message in [(empty, "is empty"), (text, "not an image PIL can read"),
                            (cut, "truncated or corrupt"), (huge, "too large to decode safely"),
                            (tmp_path / "absent.jpg", "does not exist")]:
        with pytest.raises(InputError, match=message):
            load_image(str(source))
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(buf.getvalue(), max_pixels=64 * 64 - 1)
    assert load_image(buf.getvalue()).size == (64, 64)


def test_bad_prompts_say_what_is_wrong():
    ours, _ = processors(context=12)
    im = make_image("RGB", 8, 8, 0)
    with pytest.raises(InputError, match=r"0 <image> placeholder\(s\).*1 image\(s\)"):
        ours("no placeholder here", [im])
    with pytest.raises(InputError, match=r"2 <image> placeholder\(s\).*1 image\(s\)"):
        ours("<image> and <image>", [im])
    with pytest.raises(InputError, match=r"1 <image> placeholder\(s\).*0 image\(s\)"):
        ours("<image> alone")
    with pytest.raises(InputError, match="prompt 0 is .* tokens .* context is 12"):
        ours("<image> what is in the image? describe the picture in detail", [im])
    assert ours("<image> a", [im])["input_ids"].shape[1] <= 12


def test_processor_round_trips_through_its_files(tmp_path):
    ours, _ = processors()
    ours.image = ImageProcessor(size=8, crop=(8, 8), pad_to_square=True)
    for name, text in ours.files().items():
        (tmp_path / name).write_text(text)
    back = Processor.from_dir(ours.cfg, tmp_path)
    assert back.image == ours.image
    assert back.encode("<image> the cat") == ours.encode("<image> the cat")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    hf = CLIPImageProcessorPil.from_pretrained(tmp_path)
    assert hf.crop_size["height"] == 8 and hf.size["shortest_edge"] == 8


def test_images_load_from_urls(tmp_path):
    import functools
    import http.server
    import threading
    make_image("RGBA", 30, 20, 0).save(tmp_path / "cat.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert load_image(f"{url}/cat.png").size == (30, 20)
        with pytest.raises(InputError, match="cannot download image .*dog.png.*404"):
            load_image(f"{url}/dog.png")
    finally:
        server.shutdown()
