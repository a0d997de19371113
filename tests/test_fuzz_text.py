"""Fuzz the text entry points: the processor's prompts (strings, placeholders, images, lists)
and training data files (JSONL records, mutated). Each case runs in the sandbox; it succeeds
and equals its reference, or it raises one of skipvision's errors naming what is wrong (for
data files: every bad line, by number)."""
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st
from PIL import Image

from fuzz_support import expect, fuzz, tiny_model
from skipvision.errors import SkipvisionError
from skipvision.training.data import load_conversations

pytestmark = pytest.mark.fuzz
IMAGE = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)


def prompts_case(prompts, n_images: int):
    _, processor = tiny_model()
    try:
        out = processor(prompts, [Image.fromarray(IMAGE)] * n_images)
    except SkipvisionError as e:
        return ("refused", type(e).__name__, str(e))
    want = [processor.encode(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
    return ("encoded", out["input_ids"], out["attention_mask"], want)


pieces = st.sampled_from(["<image>", "<image>\n", "what", " is", " it?", "", "USER:", "é",
                          "\x00", "<imag", "image>", " " * 3, "猫"])
text = st.lists(pieces, max_size=8).map("".join)


@fuzz(200)
@given(prompts=st.one_of(text, st.lists(text, max_size=3), st.lists(st.one_of(text, st.none(),
                                                                              st.integers()))),
       extra=st.integers(-1, 1))
def test_processor_prompts(box, prompts, extra):
    """A success is the processor's own encoding of each prompt, left-padded."""
    n = sum(p.count("<image>") for p in ([prompts] if isinstance(prompts, str) else prompts)
            if isinstance(p, str))
    got = expect("processor prompts", box(prompts_case, prompts, max(0, n + extra)),
                 ["prompt", "<image>", "image"])
    if got[0] == "encoded":
        ids, mask, want = got[1:]
        for row, m, w in zip(ids, mask, want):
            assert row[m.bool()].tolist() == w


GOOD = {"id": "a", "image": "img.png", "type": "kind", "conversations": [
    {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a cat"}]}
EDITS = [("id", 5), ("image", None), ("image", 7), ("image", "../nowhere.png"), ("image", ""),
         ("conversations", []), ("conversations", "hi"), ("type", ["x"]),
         ("conversations", [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]),
         ("conversations", [{"from": "human", "value": "<image> <image>"},
                            {"from": "gpt", "value": "x"}]),
         ("conversations", [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]),
         ("conversations", [{"from": "human", "value": "word " * 300},
                            {"from": "gpt", "value": "x"}])]


def data_case(path, skip_bad: bool):
    _, processor = tiny_model()
    try:
        data = load_conversations(path, processor, skip_bad=skip_bad)
    except SkipvisionError as e:
        return ("refused", type(e).__name__, str(e), getattr(e, "problems", None))
    return ("loaded", len(data), data.problems)


@fuzz(200)
@given(lines=st.lists(st.one_of(st.just("good"), st.sampled_from(EDITS), st.binary(max_size=12)),
                      min_size=1, max_size=6), skip_bad=st.booleans())
def test_training_data_files(box, tmp_path_factory, lines, skip_bad):
    """Every bad line is found and named by number; good lines load, or skip_bad keeps them."""
    root = tmp_path_factory.mktemp("data")
    Image.fromarray(IMAGE).save(root / "img.png")
    raw, bad = [], set()
    for n, line in enumerate(lines, start=1):
        if line == "good":
            raw.append(json.dumps(GOOD).encode())
        elif isinstance(line, tuple):
            raw.append(json.dumps({**GOOD, line[0]: line[1]}).encode())
        else:
            raw.append(line.replace(b"\n", b" "))
    (root / "d.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    got = expect("training data files", box(data_case, root / "d.jsonl", skip_bad),
                 ["d.jsonl"])
    good = sum(1 for line in lines if line == "good")
    if got[0] == "loaded":
        assert got[1] >= good and (skip_bad or not got[2])
        bad = {n for n, _ in got[2]}
    elif got[3] is not None:  # a DataError: every problem has a line number in the file
        bad = {n for n, _ in got[3]}
        assert bad and all(1 <= n <= len(lines) or n == 0 for n in bad)
    assert not any(lines[n - 1] == "good" for n in bad if n), "a good line was called bad"
