"""Shared by the fuzz suites (marker `fuzz`): a tiny checkpoint, the cases the sandbox runs,
and what every outcome must be.

A drawn case either succeeds and equals its reference, or raises one of skipvision's own
errors (skipvision.errors) whose message names the file or key at fault. Anything else (a
raw exception, a hang past the sandbox's time limit, an allocation past its memory limit)
fails the test. The counts of drawn cases per suite are printed at the end of the run.
"""
from __future__ import annotations

import functools
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from PIL import Image

from helpers import randomize_
from skipvision import Llava, LlavaConfig, Processor, TextConfig, VisionConfig, load_pretrained
from skipvision.errors import SkipvisionError
from skipvision.io.images import ImageProcessor
from skipvision.io.saving import save_pretrained
from tiny_tokenizer import tiny_tokenizer

def fuzz(n: int):
    """Hypothesis settings of a fuzz suite: n cases, the same ones every run (derandomized)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


COUNTS: Counter = Counter()  # suite -> drawn cases, printed by FuzzSummary
OUTCOMES: Counter = Counter()  # (suite, "refused" / "loaded" / ...) -> cases


def tiny_model() -> tuple[Llava, Processor]:
    """A 2-layer CLIP (8 px images, 4 image tokens) and a 1-layer LLaMA, random weights."""
    tok = tiny_tokenizer()
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                            num_attention_heads=2, image_size=8, patch_size=4),
        text=TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=8, intermediate_size=16,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        max_position_embeddings=256, rms_norm_eps=1e-5),
        image_token_id=tok.token_to_id("<image>"))
    return randomize_(Llava(cfg), 0).eval(), Processor(cfg, tok, ImageProcessor(8, (8, 8)))


@functools.lru_cache(maxsize=1)
def tiny_model64() -> Llava:
    """tiny_model's weights in float64, built once per process (the cases only read it)."""
    return tiny_model()[0].double()


def write_checkpoint(directory: Path) -> Path:
    model, processor = tiny_model()
    save_pretrained(model, directory, processor)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
                    ).save(directory / "sample.png")
    return directory


def fresh_copy(template: Path, where: Path) -> Path:
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(template, where)
    return where


def answer(model, processor, image: Path) -> torch.Tensor:
    inputs = processor(processor.format("what is in the image?"), [image])
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["pixel_values"].to(model_dtype(model)),
                     inputs["attention_mask"])


def model_dtype(model):
    return next(model.parameters()).dtype


# ------------------------------------------------------------ cases (run in the sandbox)
def load_case(path: Path, image: Path):
    """("refused", error class, message) or ("loaded", logits) for load_pretrained(path)."""
    try:
        model, processor = load_pretrained(path, dtype="float32")
        return ("loaded", answer(model, processor, image))
    except SkipvisionError as e:
        return ("refused", type(e).__name__, str(e))


def library_case(path: Path, image: Path):
    """The reference: the safetensors library reads the weights the folder names (the index's
    shards, or model.safetensors), transformers' key names are mapped, and the model is built
    from config.json with a strict load_state_dict. ("refused", message) if any step fails."""
    from safetensors.torch import load_file
    from skipvision import from_hf
    from skipvision.io.keys import is_ignored, map_key
    try:
        cfg = from_hf(json.loads((path / "config.json").read_text()))
        index = path / "model.safetensors.index.json"
        names = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
                 if index.exists() else ["model.safetensors"])
        state = {}
        for name in names:
            assert "/" not in name and name.endswith(".safetensors"), name
            for k, v in load_file(path / name).items():
                assert k not in state, f"{k} twice"
                state[k] = v
        model = Llava(cfg)
        mapped = {map_key(k): v.float() for k, v in state.items() if not is_ignored(k)}
        if cfg.text.tie_word_embeddings:
            mapped["language_model.lm_head.weight"] = mapped[
                "language_model.model.embed_tokens.weight"]
        model.load_state_dict(mapped, strict=True)
        return ("loaded", answer(model.eval(), Processor.from_dir(cfg, path), image))
    except Exception as e:  # noqa: BLE001 - the reference refusing is an outcome, not a bug
        return ("refused", f"{type(e).__name__}: {e}")


def transformers_case(path: Path, image: Path, key: tuple = ()):
    """The reference for config.json changes: transformers' own loader. JSON writes 1.0 as 1,
    so an integer at `key` is retried as a float where transformers' typing wants one."""
    from transformers import LlavaForConditionalGeneration
    try:
        hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001
        cfg = json.loads((path / "config.json").read_text())
        where = cfg
        for k in key[:-1]:
            where = where[k]
        if not key or type(where.get(key[-1])) is not int:
            return ("refused", f"{type(e).__name__}: {e}")
        where[key[-1]] = float(where[key[-1]])
        (path / "config.json").write_text(json.dumps(cfg))
        return transformers_case(path, image)
    try:
        _, processor = load_pretrained(path, dtype="float32")
        inputs = processor(processor.format("what is in the image?"), [image])
        with torch.no_grad():
            return ("loaded", hf(**inputs).logits)
    except Exception as e:  # noqa: BLE001
        return ("refused", f"{type(e).__name__}: {e}")


PROMPT = "USER: <image>\nwhat is in the image? ASSISTANT:"


def processor_case(path: Path, image: Path):
    """("loaded", input ids, pixel values) from the checkpoint's processor, or refused."""
    try:
        _, processor = load_pretrained(path, dtype="float32")
        inputs = processor(PROMPT, [image])
        return ("loaded", inputs["input_ids"][0].tolist(), inputs["pixel_values"])
    except SkipvisionError as e:
        return ("refused", type(e).__name__, str(e))


def hf_processor_case(path: Path, image: Path, n_image_tokens: int):
    """The reference: transformers' CLIP image processor and fast tokenizer on the same
    files, each <image> expanded to n_image_tokens ids."""
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast
    try:
        pixels = CLIPImageProcessor.from_pretrained(path)(images=[Image.open(image)],
                                                        return_tensors="pt")["pixel_values"]
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        image_id = tok.convert_tokens_to_ids("<image>")
        ids = []
        for i in tok(PROMPT)["input_ids"]:
            ids += [i] * (n_image_tokens if i == image_id else 1)
        return ("loaded", ids, pixels, image_id is not None and image_id != tok.unk_token_id)
    except Exception as e:  # noqa: BLE001
        return ("refused", f"{type(e).__name__}: {e}")


# ------------------------------------------------------------ what an outcome must be
def expect(suite: str, outcome, names=()) -> tuple:
    """The case's value; fails unless it ran to an end (no raw exception, hang or blow-up)
    and, if refused, its message names one of `names` (a file or a key)."""
    COUNTS[suite] += 1
    assert outcome.kind == "ok", f"{suite}: {outcome}"
    value = outcome.value
    OUTCOMES[suite, value[0]] += 1
    if value[0] == "refused" and names:
        assert any(n in value[2] for n in names), f"{suite}: {value[2]!r} names none of {names}"
    return value


class FuzzSummary:
    """Prints how many cases each fuzz suite drew, and how they ended."""

    def pytest_terminal_summary(self, terminalreporter):
        if not COUNTS:
            return
        w = terminalreporter
        w.section("fuzz suites: drawn cases")
        for suite, n in sorted(COUNTS.items()):
            ends = ", ".join(f"{k} {v}" for (s, k), v in sorted(OUTCOMES.items()) if s == suite)
            w.line(f"{suite:<40} {n:>6}   {ends}")
        w.line(f"{'total':<40} {sum(COUNTS.values()):>6}")
