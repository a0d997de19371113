"""Fuzz load_pretrained with hostile checkpoint folders: bytes and keys of the weights, shard
indexes, config.json values, and the processor's files. Each case runs in a sandbox (time
and memory limited); it loads and equals its reference, or it is refused by name."""
import json
import math
import struct

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

from fuzz_support import (expect, fresh_copy, fuzz, hf_processor_case, library_case, load_case,
                          processor_case, transformers_case, write_checkpoint)

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt")


def check_load(suite, box, path, names, reference=library_case, untouched=None, *more):
    """Load in the sandbox; a success must equal `reference` on the same folder, or (where
    the reference refuses and `untouched` is given) the untouched checkpoint exactly: an
    inert change."""
    got = expect(suite, box(load_case, path, path / "sample.png"), names)
    if got[0] == "loaded":
        want = box(reference, path, path / "sample.png", *more).value
        if want[0] != "loaded" and untouched is not None:
            want = box(load_case, untouched, untouched / "sample.png").value
            assert torch.equal(got[1], want[1]), f"{suite}: the reference refuses ({want}) "
            return got
        assert want[0] == "loaded", f"{suite}: we loaded what the reference refuses: {want[1]}"
        assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-6), f"{suite}: logits differ"
    return got


# ------------------------------------------------------------ byte-wise
mutations = st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete", "u64"]),
                      st.sampled_from(["header", "anywhere"]), st.integers(0, 2**32),
                      st.integers(1, 255), st.binary(min_size=1, max_size=16))


def mutate_bytes(data: bytes, how) -> bytes:
    kind, where, at, x, blob = how
    n = int.from_bytes(data[:8], "little")
    at = at % ((8 + n) if where == "header" else len(data))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ x]) + data[at + 1:]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + blob + data[at:]
    if kind == "delete":
        return data[:at] + data[at + x:]
    value = [0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1, x << 40][x % 8]
    return data[:at] + struct.pack("<Q", value) + data[at + 8:]


@fuzz(300)
@given(how=mutations)
def test_weights_mutated_byte_wise(box, template, tmp_path, how):
    path = fresh_copy(template, tmp_path / "ckpt")
    f = path / "model.safetensors"
    f.write_bytes(mutate_bytes(f.read_bytes(), how))
    check_load("checkpoint bytes", box, path, ["model.safetensors"])


# ------------------------------------------------------------ key-wise, and shard indexes
edits = st.sampled_from(["drop", "rename", "extra", "int32", "bool", "float16", "bfloat16",
                         "float64", "uint8", "transpose", "unsqueeze", "slice", "nan", "inf",
                         "empty", "shard", "shard twice"])
INDEX_NAMES = ["../x.safetensors", "/etc/passwd", "sub/model.safetensors", "model.bin", "",
               None, 5, "missing.safetensors", "model.safetensors", "..", "a\\b.safetensors"]


def edit_keys(path, edit: str, which: int, name):
    state = load_file(path / "model.safetensors")
    key = sorted(state)[which % len(state)]
    t = state[key]
    if edit == "drop":
        del state[key]
    elif edit == "rename":
        state[key + ".x" if which % 2 else "language_model." + key] = state.pop(key)
    elif edit == "extra":
        state["vision_tower.vision_model.extra"] = torch.zeros(2)
    elif edit in ("int32", "bool", "float16", "bfloat16", "float64", "uint8"):
        state[key] = t.to(getattr(torch, edit))
    elif edit in ("transpose", "unsqueeze", "slice", "empty"):
        state[key] = {"transpose": lambda: t.T.contiguous() if t.dim() == 2 else t[None],
                      "unsqueeze": lambda: t[None], "slice": lambda: t[..., :-1].contiguous(),
                      "empty": lambda: t[..., :0].contiguous()}[edit]()
    elif edit in ("nan", "inf"):
        t = t.clone()
        t.view(-1)[which % t.numel()] = math.nan if edit == "nan" else -math.inf
        state[key] = t
    if not edit.startswith("shard"):
        save_file(state, str(path / "model.safetensors"))
        return
    (path / "model.safetensors").unlink()
    keys = sorted(state)
    half = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    if edit == "shard twice":
        half["b.safetensors"] = half["b.safetensors"] + [key]
    for shard, ks in half.items():
        save_file({k: state[k] for k in ks}, str(path / shard))
    weight_map = {k: shard for shard, ks in half.items() for k in ks}
    if name != "keep":
        weight_map[key] = name
    torch.save({}, path / "model.bin")  # a pickle an index might point to
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@fuzz(300)
@given(edit=edits, which=st.integers(0, 10**6), name=st.sampled_from(INDEX_NAMES + ["keep"] * 4))
def test_weights_mutated_key_wise_and_shard_indexes(box, template, tmp_path, edit, which, name):
    path = fresh_copy(template, tmp_path / "ckpt")
    edit_keys(path, edit, which, name)
    check_load("checkpoint keys and indexes", box, path,
               ["model.safetensors", "a.safetensors", "b.safetensors", "index.json",
                "does not fit the model"])


# ------------------------------------------------------------ config.json values
HOSTILE = [None, "4", "", [], [1, 2], {}, {"a": 1}, True, False, 0, -1, -7, 1, 2, 3.5,
           math.nan, math.inf, -math.inf, 2**40, -(2**40), 1e-30, 1e30, "llama", "default"]


def config_keys(template) -> list[tuple[str, ...]]:
    cfg = json.loads((template / "config.json").read_text())
    out = [(k,) for k in cfg]
    for section in ("text_config", "vision_config"):
        out += [(section, k) for k in cfg[section]]
    return out + [("text_config", "rope_parameters", "rope_theta"),
                  ("text_config", "rope_parameters", "rope_type")]


@fuzz(300)
@given(data=st.data(), value=st.sampled_from(HOSTILE))
def test_config_json_with_wrong_types_and_values(box, template, tmp_path, data, value):
    path = fresh_copy(template, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    key = data.draw(st.sampled_from(config_keys(template)), label="key")
    where = cfg
    for k in key[:-1]:
        where = where[k]
    where[key[-1]] = value
    (path / "config.json").write_text(json.dumps(cfg))
    check_load("config.json values", box, path, ["config.json"], transformers_case, template, key)


# ------------------------------------------------------------ the processor's files
@fuzz(200)
@given(file=st.sampled_from(["preprocessor_config.json", "tokenizer.json"]),
       key=st.sampled_from(["size", "crop_size", "image_mean", "image_std", "rescale_factor",
                            "resample", "do_resize", "do_normalize", "model", "added_tokens",
                            "bytes"]),
       value=st.sampled_from(HOSTILE), how=mutations)
def test_processor_files_with_wrong_values_and_bytes(box, template, tmp_path, file, key, value,
                                                    how):
    """A success equals transformers' CLIP image processor and fast tokenizer on the files."""
    path = fresh_copy(template, tmp_path / "ckpt")
    f = path / file
    if key == "bytes":
        f.write_bytes(mutate_bytes(f.read_bytes(), how[:1] + ("anywhere",) + how[2:]))
    else:
        d = json.loads(f.read_text())
        d[key] = value
        f.write_text(json.dumps(d))
    got = expect("processor files", box(processor_case, path, path / "sample.png"),
                 [file, "crop_size"])
    if got[0] == "loaded":
        want = box(hf_processor_case, path, path / "sample.png", 4).value
        assert want[0] == "loaded", f"we read processor files transformers refuses: {want[1]}"
        assert torch.allclose(got[2], want[2], atol=1e-5), "pixel values differ"
        if want[3]:  # <image> is one token of the vocabulary, as in llava-hf
            assert got[1] == want[1], "input ids differ"
