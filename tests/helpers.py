"""Shared test helpers: tiny transformers LLaVA models, weight randomisation, comparisons."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from hypothesis import strategies as st
from PIL import Image

from skipvision import Llava, LlavaConfig, TextConfig, VisionConfig, from_hf
from skipvision.io.keys import is_ignored, map_key
from skipvision import anyres
from skipvision.kv_cache import left_pad, slots

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "tiny-llava"  # the shipped Skip-FFN model
PLAIN = ROOT / "checkpoints" / "tiny-llava-plain"


def randomize_(model: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    """Overwrite every parameter from a seeded generator, with O(1) activations throughout.

    Matrices ~ N(0, scale^2 / fan_in), norm gains ~ 1 + 0.2 N, biases and embeddings ~ N(0, s).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name and p.dim() == 1 and name.endswith("weight"):
                v = 1 + 0.2 * r
            elif p.dim() == 1 or "embed" in name:
                v = 0.5 * r
            else:
                fan_in = math.prod(p.shape[1:])
                v = scale * r / math.sqrt(fan_in)
            p.copy_(v.to(p.dtype))
    return model


@st.composite
def hf_specs(draw, max_layers: int = 3):
    """Tiny LLaVA geometries covering the options a LLaVA checkpoint can take."""
    heads = draw(st.integers(1, 4), label="heads")
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]), label="kv")
    head_dim = draw(st.sampled_from([2, 4, 8]), label="head_dim")
    width = heads * draw(st.sampled_from([head_dim, 2, 6]), label="width_per_head")
    v_heads = draw(st.integers(1, 3), label="v_heads")
    v_layers = draw(st.integers(1, 3), label="v_layers")
    patch = draw(st.integers(2, 5), label="patch")
    grid = draw(st.integers(1, 3), label="grid")
    rope_type = draw(st.sampled_from(["default", "linear", "llama3"]), label="rope")
    rope = {"rope_type": rope_type, "rope_theta": draw(st.sampled_from([10.0, 1e4, 5e5]))}
    if rope_type == "linear":
        rope["factor"] = draw(st.sampled_from([2.0, 4.0]))
    if rope_type == "llama3":
        rope.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=draw(st.sampled_from([4, 16, 64])))
    vocab = draw(st.integers(40, 90), label="vocab")
    return dict(
        text=dict(hidden_size=width, intermediate_size=draw(st.sampled_from([8, 16, 36])),
                  num_hidden_layers=draw(st.integers(1, max_layers), label="layers"),
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                  vocab_size=vocab, rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
                  rope_parameters=rope, max_position_embeddings=128,
                  tie_word_embeddings=draw(st.booleans(), label="tied")),
        vision=dict(hidden_size=4 * v_heads, intermediate_size=12, num_hidden_layers=v_layers,
                    num_attention_heads=v_heads, image_size=patch * grid, patch_size=patch),
        image_token_id=vocab - 1,
        vision_feature_layer=draw(st.integers(-(v_layers + 1), v_layers), label="feature_layer"),
        vision_feature_select_strategy=draw(st.sampled_from(["default", "full"])),
    )


def build_hf(spec: dict, seed: int, dtype=torch.float64):
    """A transformers LlavaForConditionalGeneration with randomised weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    text = LlamaConfig(**spec["text"])
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=text,
                      image_token_id=spec["image_token_id"],
                      vision_feature_layer=spec["vision_feature_layer"],
                      vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                      tie_word_embeddings=spec["text"]["tie_word_embeddings"])
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(cfg).eval()
    randomize_(hf, seed)
    if dtype == torch.float64:
        from reference.hf_float64 import make_float64
        ours = from_hf(cfg.to_dict())
        make_float64(hf, ours.text.rope, ours.text.head_dim)
    else:
        hf.to(dtype)
    return hf


def build_hf_next(spec: dict, seed: int, dtype=torch.float64):
    from transformers import (AutoConfig, CLIPVisionConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)
    from reference.hf_float64 import make_float64
    from skipvision import from_hf
    text = dict(spec["text"])
    text = AutoConfig.for_model(text.pop("model_type", "llama"), **text)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=text,
                          image_token_id=spec["image_token_id"],
                          vision_feature_layer=spec["vision_feature_layer"],
                          vision_feature_select_strategy="default",
                          image_grid_pinpoints=spec["image_grid_pinpoints"],
                          tie_word_embeddings=spec["text"]["tie_word_embeddings"])
    torch.manual_seed(seed)
    hf = randomize_(LlavaNextForConditionalGeneration(cfg).eval(), seed)
    ours = from_hf(cfg.to_dict())
    return make_float64(hf, ours.text.rope, ours.text.head_dim) if dtype == torch.float64 else (
        hf.to(dtype))


def ours_from_hf(hf) -> Llava:
    """Our model with `hf`'s weights (transformers 5 in-memory names mapped by keys.py)."""
    model = Llava(from_hf(hf.config.to_dict())).eval()
    sd = {map_key(k): v for k, v in hf.state_dict().items() if not is_ignored(k)}
    if model.cfg.text.tie_word_embeddings:
        sd.pop("language_model.lm_head.weight", None)
        sd["language_model.lm_head.weight"] = sd["language_model.model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    dtype = next(hf.parameters()).dtype
    return model.to(dtype)


def llava_inputs(cfg, seed: int, lengths, images=1, dtype=torch.float64):
    """Left-padded prompts: row b has lengths[b] text tokens and `images` (an int, or one per
    row) expanded images at random places.

    Returns input_ids, attention_mask (long), position_ids, pixel_values (I, 3, S, S) or None.
    """
    g = torch.Generator().manual_seed(seed)
    per_row = [images] * len(lengths) if isinstance(images, int) else list(images)
    n_img, rows = cfg.image_seq_length, []
    for L, k in zip(lengths, per_row):
        text = torch.randint(0, cfg.text.vocab_size - 1, (L,), generator=g)
        text[text == cfg.image_token_id] = 0
        pieces, cut = [], sorted(torch.randint(0, L + 1, (k,), generator=g).tolist())
        prev = 0
        for c in cut:
            pieces += [text[prev:c], torch.full((n_img,), cfg.image_token_id)]
            prev = c
        rows.append(torch.cat(pieces + [text[prev:]]))
    ids, mask = left_pad(rows, 0)
    pos, _ = slots(mask)
    S = cfg.vision.image_size
    px = torch.randn(sum(per_row), 3, S, S, generator=g, dtype=torch.float64)
    return ids, mask.long(), pos, px.to(dtype) if sum(per_row) else None


def next_inputs(cfg, seed: int, lengths, sizes, dtype=torch.float64):
    """Left-padded prompts, one image each of sizes[b] = (height, width) at a random place;
    pixel_values (I, tiles, 3, S, S) of random tiles, zero tiles after an image's own."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for L, (h, w) in zip(lengths, sizes):
        text = torch.randint(0, cfg.text.vocab_size - 1, (L,), generator=g)
        text[text == cfg.image_token_id] = 0
        cut = int(torch.randint(0, L + 1, (1,), generator=g))
        n = anyres.image_tokens(cfg, h, w)
        rows.append(torch.cat([text[:cut], torch.full((n,), cfg.image_token_id), text[cut:]]))
    ids, mask = left_pad(rows, 0)
    tiles = [1 + r * c for r, c in (anyres.tile_grid(cfg, h, w) for h, w in sizes)]
    S = cfg.vision.image_size
    px = torch.randn(len(sizes), max(tiles), 3, S, S, generator=g, dtype=torch.float64)
    for i, k in enumerate(tiles):
        px[i, k:] = 0
    return ids, mask.long(), slots(mask)[0], px.to(dtype), torch.tensor(sizes)


def example_module(name: str = "generate"):
    """A script of examples/ imported as a module (its main() runs in-process); examples/ goes
    on sys.path, as it is for a script, for the helper modules beside it."""
    if str(ROOT / "examples") not in sys.path:
        sys.path.append(str(ROOT / "examples"))
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_error(main, argv, capsys) -> str:
    """Run an example's main(argv) as its script does: a user's mistake must end it with exit
    status 2 and one line on stderr, which is returned."""
    run = example_module("cli").run_main
    capsys.readouterr()
    try:
        run(main, argv)
    except SystemExit as e:
        code = e.code
    else:
        raise AssertionError(f"{argv} did not fail")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    return err


MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "CMYK", "I;16", "1"]


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    """A random image of `mode` and size w x h, pixels from a seeded generator."""
    r = np.random.default_rng(seed)
    u8 = lambda c: r.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    if mode in ("RGB", "RGBA", "LA"):
        return Image.fromarray(u8({"RGB": 3, "RGBA": 4, "LA": 2}[mode]))
    if mode == "L":
        return Image.fromarray(u8(1)[..., 0])
    if mode.startswith("P"):
        im = Image.fromarray(u8(3)).quantize(colors=int(r.integers(2, 64)))
        if mode.endswith("transparency"):
            im.info["transparency"] = 0
        return im
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), u8(4).tobytes())
    if mode == "I;16":  # 16-bit: values above 255 saturate when PIL converts to RGB
        return Image.fromarray(r.integers(0, int(r.choice([300, 65536])), (h, w), dtype=np.uint16))
    return Image.fromarray(u8(1)[..., 0] > 127)  # mode "1"


def hf_image_processor(size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size},
                                 crop_size={"height": size, "width": size})


def publish(cache: Path, repo_id: str, src: Path, revision: str = "main") -> str:
    """Lay `src`'s files out as `repo_id` at `revision` in a Hub cache; returns the commit."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@contextlib.contextmanager
def offline_cache(cache: Path):
    """HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1 (huggingface_hub reads both at import: patch them)."""
    import huggingface_hub.constants as c
    with mock.patch.object(c, "HF_HUB_CACHE", str(cache)), mock.patch.object(c, "HF_HUB_OFFLINE",
                                                                             True):
        yield


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str = ""):
    diff = (a.double() - b.double()).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    assert worst <= atol, f"{what}: max |diff| {worst:.3e} > {atol:.1e} (mean {diff.mean():.3e})"


def tiny(layers: int, image_size: int, seed: int = 0) -> Llava:
    """A fixed small LLaVA in float64 (weights from `seed`), (image_size / 2)^2 tokens an
    image."""
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=image_size,
                                          patch_size=2),
                      text=TextConfig(vocab_size=48, hidden_size=8, intermediate_size=8,
                                      num_hidden_layers=layers, num_attention_heads=2),
                      image_token_id=47, vision_feature_layer=1)
    return randomize_(Llava(cfg), seed).double().eval()
