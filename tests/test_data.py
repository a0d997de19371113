"""The JSONL conversation format, the synthetic dataset, its tokenizer, and exact match."""
from __future__ import annotations

import hashlib
import json
import random
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skipvision import LlavaConfig, TextConfig, VisionConfig
from skipvision.training.data import IGNORE, DataError, collate, encode, exact_match, load_conversations
from skipvision.io.images import ImageProcessor
from skipvision.io.processor import Processor
from skipvision.training.synthetic import (CELLS, COLOURS, build_tokenizer, caption, conversation,
                                  make_scene, render, vocabulary, write_dataset)

SIZE = 24  # small images keep these tests fast; the shipped model uses 96


def processor(image_size=SIZE, context=320):
    tok = build_tokenizer()
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=image_size,
                                          patch_size=4),
                      text=TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=8,
                                      intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=context,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=3),
                      image_token_id=4)
    return Processor(cfg, tok, ImageProcessor(image_size, (image_size, image_size)))


def _digest(root, prefix: str = ""):
    """Hash of the files under root whose names start with prefix (all by default)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name.startswith(prefix):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_and_seeded(tmp_path):
    a = write_dataset(tmp_path / "a", 30, 10, seed=3, size=SIZE)
    write_dataset(tmp_path / "b", 30, 10, seed=3, size=SIZE)
    c = write_dataset(tmp_path / "c", 30, 10, seed=4, size=SIZE)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert a["train"].read_text() != c["train"].read_text()
    alone = write_dataset(tmp_path / "d", 30, 10, seed=3, size=SIZE, splits=("test",))
    assert list(alone) == ["test"] and not (tmp_path / "d" / "train.jsonl").exists()
    assert alone["test"].read_text() == a["test"].read_text()
    assert _digest(tmp_path / "d") == _digest(tmp_path / "a", "test")


def test_held_out_images_never_occur_in_training_and_follow_its_distribution(tmp_path):
    paths = write_dataset(tmp_path, 300, 200, seed=0)
    recs = {s: [json.loads(x) for x in paths[s].read_text().splitlines()]
            for s in ("train", "test")}
    digest = {s: {hashlib.sha256((tmp_path / r["image"]).read_bytes()).hexdigest()
                  for r in recs[s]} for s in recs}
    assert len(digest["test"]) == 200
    assert not digest["train"] & digest["test"]
    shapes = {s: statistics.mean(len(r["scene"].split(" , ")) for r in recs[s]) for s in recs}
    assert abs(shapes["train"] - shapes["test"]) < 0.25, shapes


@given(st.integers(0, 2**32 - 1))
def test_rendered_scene_and_answers_agree(seed):
    """Every shape's colour is at its centre, in the cell its answers name; colours are
    distinct; answers follow the scene (recomputed here independently of the generator)."""
    rng = random.Random(seed)
    scene = make_scene(rng, 96)
    img = render(scene, 96)
    assert 2 <= len(scene) <= 4 and len({s.colour for s in scene}) == len(scene)
    for s in scene:
        cx, cy = s.x + s.side // 2, s.y + s.side // 2
        assert img.getpixel((cx, cy)) == COLOURS[s.colour]
        assert (cy // 48) * 2 + cx // 48 == s.cell
        assert s.x // 48 == (s.x + s.side - 1) // 48 and s.y // 48 == (s.y + s.side - 1) // 48
    conv, _ = conversation(scene, rng, "qa", turns=9)
    assert conv[0]["value"].startswith("<image>\n") and len(conv) == 2 * 7  # every type, once
    named = {s.colour: s for s in scene}
    for q, a in zip(conv[0::2], conv[1::2]):
        words, a = q["value"].replace("<image>", "").split(), a["value"]
        if words[:3] == ["how", "many", "objects"]:
            assert a == str(len(scene))
        elif words[:2] == ["how", "many"]:
            assert a == str(sum(s.kind + "s" == words[2] for s in scene))
        elif words[:3] == ["is", "there", "a"]:
            assert a == ("yes" if words[3] in named else "no")
        elif words[:2] == ["where", "is"]:
            assert a == CELLS[named[words[3]].cell]
        elif words[:3] == ["what", "colour", "is"]:
            (s,) = [s for s in scene if CELLS[s.cell] == " ".join(words[7:-1])]
            assert a == s.colour
        elif words[:3] == ["what", "shape", "is"]:
            assert a == named[words[4]].kind
        else:  # is the A object rel the B object ?
            assert words[:2] == ["is", "the"] and words[3] == "object"
            x, y = named[words[2]], named[words[-3]]
            rel = " ".join(words[4:-4])
            truth = {"left of": x.cell % 2 < y.cell % 2, "right of": x.cell % 2 > y.cell % 2,
                     "above": x.cell // 2 < y.cell // 2, "below": x.cell // 2 > y.cell // 2}
            assert a == ("yes" if truth[rel] else "no")


def test_tokenizer_covers_the_synthetic_language(tmp_path):
    tok = build_tokenizer()
    unk = tok.token_to_id("<unk>")
    rng = random.Random(0)
    for i in range(200):
        scene = make_scene(rng)
        conv, _ = conversation(scene, rng, "qa" if i % 2 else "caption", turns=9)
        for turn in conv:
            ids = tok.encode(turn["value"], add_special_tokens=False).ids
            assert unk not in ids, turn["value"]
            if turn["from"] == "gpt":
                assert tok.decode(ids) == turn["value"]
    assert tok.encode("USER: <image>\nWhat colour is the circle? ASSISTANT:").tokens == [
        "<s>", "user", ":", "<image>", "what", "colour", "is", "the", "circle", "?", "assistant",
        ":"]
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")] == [
        0, 1, 2, 3, 4]
    assert set(vocabulary()) >= {"top", "left", "yes", "4", "triangles"}


def test_encode_puts_labels_on_answers_only(tmp_path):
    proc = processor()
    path = tmp_path / "d.jsonl"
    render(make_scene(random.Random(0), SIZE), SIZE).save(tmp_path / "x.png")
    conv = [{"from": "human", "value": "<image>\nhow many objects are there ?"},
            {"from": "gpt", "value": "2"}, {"from": "human", "value": "is there a red circle ?"},
            {"from": "gpt", "value": "top left"}]
    path.write_text(json.dumps({"image": "x.png", "conversations": conv}) + "\n")
    data = load_conversations(path, proc)
    enc = data.encoded[0]
    tok = proc.tokenizer
    first = proc.encode(proc.format("how many objects are there ?"))
    assert enc.input_ids[:len(first)] == first  # the same ids generation sees
    assert first.count(4) == proc.cfg.image_seq_length and first[0] == 1
    labelled = [t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE]
    assert labelled == tok.encode("2", add_special_tokens=False).ids + [2] + tok.encode(
        "top left", add_special_tokens=False).ids + [2]
    assert all(l in (IGNORE, t) for t, l in zip(enc.input_ids, enc.labels))
    assert encode(data.records[0], proc, answers=False).input_ids == first


def test_bad_records_are_reported_with_line_numbers(tmp_path):
    proc = processor(context=60)
    render(make_scene(random.Random(0), SIZE), SIZE).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nhow many objects are there ?"},
        {"from": "gpt", "value": "1"}]}
    lines = [good,  # 1
             "{not json",  # 2
             {**good, "image": "missing.png"},  # 3
             {**good, "conversations": [good["conversations"][0],
                                        {"from": "gpt", "value": "  "}]},  # 4
             {**good, "conversations": good["conversations"] + [
                 {"from": "human", "value": "how many objects are there ?"},
                 {"from": "gpt", "value": "1"}] * 6},  # 5: > 60 tokens
             good,  # 6
             {**good, "image": "broken.png"},  # 7
             {"image": "ok.png", "conversations": [{"from": "gpt", "value": "x"}]}]  # 8
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(path, proc)
    assert [n for n, _ in e.value.problems] == [2, 3, 4, 5, 7, 8]
    msg = str(e.value)
    for n, what in [(2, "malformed JSON"), (3, "not found"), (4, "empty answer"),
                    (5, "longer than the context of 60"), (7, "not a readable image")]:
        assert f"bad.jsonl:{n}: " in msg and what in msg, (n, what, msg)
    assert "--skip-bad-data" in msg
    data = load_conversations(path, proc, skip_bad=True)
    assert [r.line for r in data.records] == [1, 6]
    assert [n for n, _ in data.problems] == [2, 3, 4, 5, 7, 8]


def test_an_image_that_breaks_after_validation_names_its_line(tmp_path):
    proc = processor()
    paths = write_dataset(tmp_path, 4, 1, size=SIZE)
    data = load_conversations(paths["train"], proc)
    data.records[2].image.write_bytes(data.records[2].image.read_bytes()[:40])  # truncated
    assert data.pixels(1).shape == (3, SIZE, SIZE)
    with pytest.raises(DataError, match=r"train.jsonl:3: "):
        data.pixels(2)


def test_collate_pads_on_the_left(tmp_path):
    proc = processor()
    paths = write_dataset(tmp_path, 6, 1, size=SIZE)
    data = load_conversations(paths["train"], proc)
    items = [data.encoded[i] for i in range(3)]
    ids, mask, labels, px = collate(items, 3, [data.pixels(i) for i in range(3)])
    assert px.shape == (3, 3, SIZE, SIZE)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        assert ids[i, -n:].tolist() == e.input_ids and labels[i, -n:].tolist() == e.labels
        assert mask[i].tolist() == [False] * (ids.shape[1] - n) + [True] * n
        assert (labels[i, :-n] == IGNORE).all() and (ids[i, :-n] == 3).all()


def test_exact_match_normalises_case_space_and_full_stop():
    assert exact_match(" Top  Left. ", "top left")
    assert not exact_match("top", "top left")
    assert not exact_match("2", "3")


def test_caption_lists_shapes_in_raster_order():
    scene = make_scene(random.Random(5))
    parts = caption(scene).split(" , ")
    assert len(parts) == len(scene)
    assert [CELLS.index(" ".join(p.split()[2:])) for p in parts] == sorted(s.cell for s in scene)
    assert torch.tensor([s.cell for s in scene]).diff().gt(0).all()
