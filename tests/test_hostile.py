"""Each hostile input named in the hardening review, as a test: refused with a clear error
naming the file, key or value (or, for a CLI, one line and exit status 2), nothing lost."""
import io
import json
import math
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fuzz_support import fresh_copy, tiny_model, write_checkpoint
from helpers import cli_error, example_module, llava_inputs
from skipvision import SkipConfig, generate, load_pretrained
from skipvision.errors import CheckpointError, ConfigError, InputError, NonFiniteError
from skipvision.io.images import ImageProcessor
from skipvision.io.loading import load_skip_config
from skipvision.io.saving import save_pretrained
from skipvision.training.data import DataError, read_jsonl


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("hostile") / "ckpt")


@pytest.fixture
def ckpt(template, tmp_path):
    return fresh_copy(template, tmp_path / "ckpt")


def edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def sharded(ckpt, names):
    """Split the weights into a.safetensors and b.safetensors; the index names `names`."""
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, str(ckpt / "a.safetensors"))
    save_file({k: state[k] for k in keys[1::2]}, str(ckpt / "b.safetensors"))
    weight_map = {k: names[i % 2] for i, k in enumerate(keys)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# ------------------------------------------------------------ security
@pytest.mark.parametrize("name", ["../a.safetensors", "/etc/passwd", "sub/a.safetensors"])
def test_a_shard_index_cannot_name_a_file_outside_the_folder(ckpt, name):
    sharded(ckpt, [name, "b.safetensors"])
    (ckpt.parent / "a.safetensors").write_bytes((ckpt / "a.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_pretrained(ckpt)


def test_a_link_out_of_the_folder_is_not_followed(ckpt, tmp_path):
    (tmp_path / "elsewhere.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_pretrained(ckpt)


def test_a_safetensors_index_never_leads_to_a_pickle(ckpt):
    sharded(ckpt, ["a.safetensors", "b.bin"])
    torch.save(load_file(ckpt / "b.safetensors"), ckpt / "b.bin")
    with pytest.raises(CheckpointError, match="names .safetensors shards only"):
        load_pretrained(ckpt)


def test_overlapping_safetensors_byte_ranges_are_refused(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k][
        "data_offsets"][0])[:2]
    if header[a]["shape"] == header[b]["shape"]:  # b's bytes read again as a's
        header[b]["data_offsets"] = header[a]["data_offsets"]
    else:
        header[b]["data_offsets"][0] -= 4
    text = json.dumps(header).encode().ljust(n)
    f.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("size", [(1, 100_000), (1, 10_000), (100_000, 1)])
def test_a_tiny_png_of_an_extreme_aspect_ratio_is_refused_before_any_allocation(size):
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG", optimize=True)
    assert len(buf.getvalue()) < 2000  # a few hundred bytes on disk
    with pytest.raises(InputError, match="aspect ratio too extreme"):
        ImageProcessor(96, (96, 96))([buf.getvalue()])
    with pytest.raises(InputError, match="aspect ratio too extreme"):
        ImageProcessor(96, (96, 96), pad_to_square=True)([buf.getvalue()])


# ------------------------------------------------------------ lost data
def test_saving_without_a_processor_leaves_no_stale_files(ckpt):
    model, _ = tiny_model()
    (ckpt / "skip_config.json").write_text(json.dumps({"retained": 1, "skipped": 1}))
    save_pretrained(model, ckpt)  # the tokenizer, preprocessing and skip settings are gone
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    assert load_skip_config(ckpt) is None


# ------------------------------------------------------------ silent wrong results
@pytest.mark.parametrize("layer", [-9, 5, [-2, 9], 1.5, True, []])
def test_vision_feature_layer_out_of_range_is_refused_not_wrapped(ckpt, layer):
    edit_json(ckpt / "config.json", lambda d: d.update(vision_feature_layer=layer))
    with pytest.raises(CheckpointError, match="config.json: vision_feature_layer must be"):
        load_pretrained(ckpt)


def test_nan_weights_are_refused_naming_the_tensor(ckpt, capsys):
    state = load_file(ckpt / "model.safetensors")
    state["multi_modal_projector.linear_1.bias"][0] = math.nan
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="multi_modal_projector.linear_1.bias holds NaN"):
        load_pretrained(ckpt)
    err = cli_error(example_module().main, ["--model", str(ckpt), "--offline"], capsys)
    assert "holds NaN or inf" in err


@pytest.mark.parametrize("key,value,match", [
    ("image_std", [0.3, 0.0, 0.3], "image_std must be 3 numbers >= 1e-09"),
    ("image_mean", [0.5], "image_mean must be 3 numbers"), ("size", "336", "size must be"),
    ("crop_size", {"height": -1, "width": 8}, "crop_size must be"),
    ("do_normalize", "yes", "do_normalize must be"), ("resample", 9, "resample must be")])
def test_bad_preprocessor_values_are_refused_by_key(ckpt, key, value, match):
    edit_json(ckpt / "preprocessor_config.json", lambda d: d.update({key: value}))
    with pytest.raises(CheckpointError, match=f"preprocessor_config.json: .*{match}"):
        load_pretrained(ckpt)


def test_a_right_padded_batch_is_refused_on_the_plain_path():
    model, _ = tiny_model()
    ids, mask, _, px = llava_inputs(model.cfg, 0, [2, 5], 1, torch.float32)
    right = torch.stack([m.roll(int((m == 0).sum()), 0) for m in mask])
    with pytest.raises(InputError, match="padded on the right"):
        generate(model, ids, px, right)


@pytest.mark.parametrize("layers", [(1.5,), (-1,), (True,), ("0",), ()])
def test_skip_layers_must_be_layer_numbers(layers):
    with pytest.raises(ConfigError, match="SkipConfig.layers"):
        SkipConfig(layers=layers)


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=-1), "max_new_tokens must be"),
    (dict(max_new_tokens=250), "exceeds the model's context of 256"),
    (dict(temperature=math.nan), "temperature must be"), (dict(top_p=0.0), "top_p must be"),
    (dict(top_k=0), "top_k must be")])
def test_generation_settings_are_checked(kw, match):
    model, _ = tiny_model()
    ids, mask, _, px = llava_inputs(model.cfg, 0, [3], 1, torch.float32)
    with pytest.raises(InputError, match=match):
        generate(model, ids, px, mask, **kw)


def test_token_ids_outside_the_vocabulary_and_empty_prompts_are_refused():
    model, processor = tiny_model()
    ids, mask, _, px = llava_inputs(model.cfg, 0, [3], 1, torch.float32)
    ids[0, -1] = model.cfg.text.vocab_size
    with pytest.raises(InputError, match=r"input_ids\[0, \d+\] = 402 is not a token id"):
        generate(model, ids, px, mask)
    with pytest.raises(InputError, match="non-empty list of strings"):
        processor([])


def test_non_finite_pixels_and_logits_stop_generation():
    model, _ = tiny_model()
    ids, mask, _, px = llava_inputs(model.cfg, 0, [3], 1, torch.float32)
    with pytest.raises(NonFiniteError, match="pixel_values"):
        generate(model, ids, px.fill_(math.inf), mask)
    with torch.no_grad():
        model.language_model.lm_head.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="logits of the prompt"):
        generate(model, ids, torch.zeros_like(px), mask)


# ------------------------------------------------------------ clear errors, not tracebacks
def test_integer_and_bool_tensors_are_refused_by_key(ckpt):
    state = load_file(ckpt / "model.safetensors")
    state["language_model.lm_head.weight"] = state["language_model.lm_head.weight"].int()
    state["multi_modal_projector.linear_2.bias"] = state["multi_modal_projector.linear_2.bias"] > 0
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="(?s)lm_head.weight .*stored as int32.*linear_2"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("where,key,value", [
    ("text_config", "hidden_size", "8"), ("text_config", "num_hidden_layers", 1_000_000),
    ("vision_config", "patch_size", 4.0), ("text_config", "rms_norm_eps", None),
    ("text_config", "rope_parameters", "default")])
def test_wrong_config_json_values_are_refused_at_once_by_key(ckpt, where, key, value):
    edit_json(ckpt / "config.json", lambda d: d[where].update({key: value}))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"config.json: {where}.{key} must be"):
        load_pretrained(ckpt)
    assert time.perf_counter() - t0 < 5  # before building anything large


def test_a_corrupt_tokenizer_json_names_the_file(ckpt):
    (ckpt / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match="tokenizer.json is not a tokenizer"):
        load_pretrained(ckpt)


def test_a_png_cut_inside_its_header_is_an_input_error():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    for cut in (5, 12, 20, 30):
        with pytest.raises(InputError, match="not an image PIL can read|truncated"):
            ImageProcessor(8, (8, 8))([buf.getvalue()[:cut]])


def test_an_unknown_key_in_skip_config_json_names_the_file_and_key(ckpt):
    (ckpt / "skip_config.json").write_text(json.dumps({"retained": 1, "skiped": 2}))
    with pytest.raises(CheckpointError, match=r"skip_config.json: unknown key\(s\) \['skiped'\]"):
        load_skip_config(ckpt)


@pytest.mark.parametrize("argv,match", [
    (["--skip", "none", "--retained", "10", "--skipped", "10"], "--skip none turns it off"),
    (["--temperature", "-1"], "temperature must be"),
    (["--max-new-tokens", "-3"], "max_new_tokens must be")])
def test_generate_cli_mistakes_are_one_line_and_exit_2(ckpt, capsys, argv, match):
    image = ["--image", str(ckpt / "sample.png")]
    assert match in cli_error(example_module().main, ["--model", str(ckpt)] + image + argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(ckpt, capsys):
    err = cli_error(example_module().main, ["--model", str(ckpt), "--device", "cuda"], capsys)
    assert "no CUDA device here" in err


def test_benchmark_refuses_unknown_parts(capsys):
    err = cli_error(example_module("benchmark").main, ["--skip-parts", "train,tarin"], capsys)
    assert "--skip-parts ['tarin']" in err


def test_train_cli_mistakes_are_one_line_and_exit_2(ckpt, tmp_path, capsys):
    train = example_module("train").main
    assert "--data" in cli_error(train, ["--model", str(ckpt), "--out", str(tmp_path)], capsys)
    (tmp_path / "d.jsonl").write_bytes(b'{"conversations": []}\n\xe9t\xe9\n')
    records, problems = read_jsonl(tmp_path / "d.jsonl")
    assert (2, "not UTF-8 text (byte 0)") in problems
    err = cli_error(train, ["--model", str(ckpt), "--data", str(tmp_path / "d.jsonl"),
                            "--out", str(tmp_path / "run")], capsys)
    assert "d.jsonl:2: not UTF-8" in err
    (tmp_path / "not-a-run").mkdir()
    err = cli_error(train, ["--resume", str(tmp_path / "not-a-run"), "--data",
                            str(tmp_path / "d.jsonl")], capsys)
    assert "no training checkpoint in" in err
    with pytest.raises(DataError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_an_image_that_breaks_at_step_1_says_nothing_was_saved(ckpt, tmp_path, capsys):
    image = tmp_path / "img.png"
    image.write_bytes((ckpt / "sample.png").read_bytes())
    row = {"image": str(image), "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                  {"from": "gpt", "value": "a cat"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    image.write_bytes(image.read_bytes()[:60])  # broken after the data was checked
    np.testing.assert_equal(image.stat().st_size, 60)
    err = cli_error(example_module("train").main, [
        "--model", str(ckpt), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "r"),
        "--steps", "2", "--batch-size", "1"], capsys)
    assert "img.png" in err and "no step completed, nothing was saved" in err


def test_the_bound_report_ignores_rounding_and_never_passes_nan():
    from bound_support import positions, tiny, vectors
    from skipvision.analysis import bound
    g = torch.Generator().manual_seed(0)
    pos, horizon, _, _ = positions(g, 1, 6)
    skipped = torch.zeros(1, 6, dtype=torch.bool)
    skipped[:, 2:4] = True
    r = bound.skip_ffn_bound(tiny(), vectors(g, (1, 6, 8), 1.0), pos, skipped, horizon)
    assert not r.violations()
    r.end_to_end = r.measured - 1e-14 * r.measured.abs().amax()  # below by a rounding gap
    assert not r.violations()
    r.end_to_end = r.measured * 0.5  # below by a real gap
    assert r.violations()
    r.end_to_end[-1, 0, -1] = math.nan
    assert any("NaN" in v for v in r.violations())
