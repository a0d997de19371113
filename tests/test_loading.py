"""Loading from local directories: one clear error for every way a checkpoint can be wrong,
pickles only with weights_only, and save_pretrained read back by us and by transformers."""
import json
import os
import pickle
import shutil
import tempfile

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import (assert_close, build_hf, cli_error, example_module, hf_specs, llava_inputs,
                     ours_from_hf, randomize_)
from skipvision import Llava, LlavaConfig, Processor, SkipConfig, TextConfig, VisionConfig
from skipvision.errors import CheckpointError
from skipvision.io.keys import LLAVA_PREFIXES, map_key
from skipvision.io.loading import compact, load_pretrained, load_skip_config
from skipvision.io.saving import save_pretrained
from skipvision.io.images import ImageProcessor
from tiny_tokenizer import tiny_tokenizer

TINY = dict(text=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=50,
                      rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False),
            vision=dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                        num_attention_heads=2, image_size=4, patch_size=2),
            image_token_id=49, vision_feature_layer=-2, vision_feature_select_strategy="default")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny transformers LLaVA and its save_pretrained directory."""
    root = tmp_path_factory.mktemp("ckpt")
    hf = build_hf(TINY, 0)
    hf.save_pretrained(root / "good")
    return hf, root / "good"


def _copy(saved, tmp_path):
    return shutil.copytree(saved[1], tmp_path / "copy")


def _edit_weights(directory, edit):
    path = directory / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    save_file(sd, str(path))


def test_missing_unexpected_and_misshaped_keys_in_one_error(saved, tmp_path):
    d = _copy(saved, tmp_path)

    def damage(sd):
        del sd["language_model.model.layers.1.mlp.up_proj.weight"]
        for i in range(2):  # a whole family of keys, folded into one line
            del sd[f"vision_tower.encoder.layers.{i}.layer_norm1.bias"]
        sd["language_model.model.layers.0.self_attn.rotary_extra"] = torch.zeros(3)
        sd["multi_modal_projector.linear_2.weight"] = torch.zeros(8, 7, dtype=torch.float64)
    _edit_weights(d, damage)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    msg = str(e.value)
    assert "missing (3):" in msg and "language_model.model.layers.1.mlp.up_proj.weight" in msg
    assert "vision_tower.vision_model.encoder.layers.{0-1}.layer_norm1.bias" in msg
    assert "unexpected (1):" in msg and "layers.0.self_attn.rotary_extra" in msg
    assert ("mis-shaped (1):" in msg and "multi_modal_projector.linear_2.weight (in "
            "model.safetensors): checkpoint [8, 7], model [8, 8]" in msg)


def test_config_from_another_model_does_not_fit(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    cfg["text_config"]["hidden_size"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"(?s)missing .*layers.2.*mis-shaped"):
        load_pretrained(d)


@pytest.mark.parametrize("config,message", [
    ({"model_type": "bert", "architectures": ["BertModel"]}, "describes a 'bert' model"),
    ({"model_type": "llava", "text_config": {"model_type": "qwen2"}}, "'qwen2' is not "
                                                                      "supported"),
    ({"model_type": "llava", "text_config": {"model_type": "mistral"}},  # its default window
     "sliding_window 4096: sliding-window attention is not implemented"),
    ("{not json", "is not valid JSON"),
])
def test_configs_of_other_models_are_refused(saved, tmp_path, config, message):
    d = _copy(saved, tmp_path)
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(d)


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) // 2], "is truncated"),
    (lambda b: b[:5], "not a safetensors file or is truncated"),
    (lambda b: b[:8] + b"\xff" * 16 + b[24:], "corrupt safetensors header"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "not a safetensors file"),
    (lambda b: b"", "not a safetensors file"),
])
def test_corrupt_safetensors_are_named(saved, tmp_path, damage, message):
    d = _copy(saved, tmp_path)
    path = d / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(d)


def test_pickles_load_with_weights_only_and_code_never_runs(saved, tmp_path):
    hf, _ = saved
    d = _copy(saved, tmp_path)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    model, _ = load_pretrained(d)
    ids, mask, pos, px = llava_inputs(model.cfg, 1, [3, 5])
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos,
                  output_hidden_states=True).logits
        assert_close(model(ids, px, mask, pos)[mask.bool()], want[mask.bool()], 1e-9, "logits")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"language_model.lm_head.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_pretrained(d)
    assert not marker.exists()


@settings(max_examples=4)
@given(spec=hf_specs(max_layers=2), seed=st.integers(0, 2**16), summary=st.booleans())
def test_save_pretrained_is_read_back_by_us_and_by_transformers(spec, seed, summary):
    """Our llava-hf layout: load_pretrained gives the same model, transformers the same
    logits; the Skip-Vision summary scorer's keys survive (summary_scorer.*)."""
    from transformers import LlavaForConditionalGeneration
    hf = build_hf(spec, seed)
    plain = ours_from_hf(hf)
    model = Llava(plain.cfg.replace(summary_scorer=summary)).to(torch.float64)
    scorer = {k: v for k, v in randomize_(model, seed).state_dict().items()
              if k.startswith("summary_scorer.")}
    model.load_state_dict(plain.state_dict() | scorer, strict=True)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        back, _ = load_pretrained(d)
        assert back.cfg == model.cfg
        for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
        if model.cfg.text.tie_word_embeddings:
            lm = back.language_model
            assert lm.lm_head.weight is lm.model.embed_tokens.weight
        theirs = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float64)
    from reference.hf_float64 import make_float64
    make_float64(theirs, model.cfg.text.rope, model.cfg.text.head_dim)
    ids, mask, pos, px = llava_inputs(model.cfg, seed, [2, 5])
    with torch.no_grad():
        want = theirs(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos,
                      output_hidden_states=True).logits
        got = back(ids, px, mask, pos)
    valid = mask.bool()
    assert_close(got[valid], want[valid], 1e-9 * max(1.0, want.abs().max().item()), "logits")


def test_save_writes_tokenizer_and_preprocessing_and_leaves_no_debris(tmp_path):
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                                          image_size=8, patch_size=4, intermediate_size=8),
                      text=TextConfig(vocab_size=402, hidden_size=8, num_attention_heads=2,
                                      num_hidden_layers=1, intermediate_size=8),
                      image_token_id=400)
    model = randomize_(Llava(cfg), 0)
    tok = tiny_tokenizer()
    processor = Processor(cfg, tok, ImageProcessor(size=8, crop=(8, 8)))
    save_pretrained(model, tmp_path, processor)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json"]
    _, back = load_pretrained(tmp_path, dtype="float32")
    assert back.encode("<image> a cat") == processor.encode("<image> a cat")
    assert back.image == processor.image
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(path):
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):  # a failure after the weights were written
        save_pretrained(randomize_(Llava(cfg), 1), tmp_path, processor, files={"x": disk_full})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old one intact
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))  # and nothing left beside it
    (tmp_path / "pytorch_model.bin").write_bytes(b"stale")  # replaced as a whole: no stale file
    save_pretrained(model, tmp_path, None, skip=SkipConfig(retained=2, skipped=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model.safetensors", "skip_config.json"]
    assert load_skip_config(tmp_path) == SkipConfig(retained=2, skipped=1)


def test_dtype_and_device_are_applied(saved):
    model, _ = load_pretrained(saved[1], dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_pretrained(saved[1], dtype="float8")


def test_every_llava_hf_name_maps_to_itself_and_compact_lists_every_key():
    model = Llava(LlavaConfig(vision=VisionConfig(hidden_size=8, num_attention_heads=2,
                                                  num_hidden_layers=2, image_size=4, patch_size=2),
                              text=TextConfig(vocab_size=10, hidden_size=8, num_attention_heads=2,
                                              num_hidden_layers=3, intermediate_size=4),
                              summary_scorer=True))
    names = list(model.state_dict())
    assert all(map_key(k, LLAVA_PREFIXES) == k for k in names)
    keys = ["a.layers.0.w", "a.layers.1.w", "a.layers.2.w", "a.layers.5.w", "b", "a.layers.3.x"]
    assert compact(keys) == ["a.layers.{0-2,5}.w", "b", "a.layers.3.x"]


FLAGS = ["--model", "--revision", "--image", "--prompt", "--template", "--max-new-tokens",
         "--temperature", "--top-p", "--seed", "--dtype", "--device", "--offline", "--report",
         "--skip", "--retained", "--skipped", "--mask", "--kv"]


def test_generate_example_runs_on_a_local_checkpoint(tmp_path, capsys):
    """`examples/generate.py --model DIR --image IMG --prompt ...`: the printed answer is what
    generate() gives for the processor's inputs; --help documents every flag."""
    import numpy as np
    from PIL import Image
    from skipvision import generate
    tok = tiny_tokenizer()
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, num_attention_heads=2,
                                          num_hidden_layers=2, image_size=16, patch_size=4,
                                          intermediate_size=32),
                      text=TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, intermediate_size=64,
                                      max_position_embeddings=256),
                      image_token_id=tok.token_to_id("<image>"), summary_scorer=True)
    processor = Processor(cfg, tok, ImageProcessor(size=16, crop=(16, 16)))
    model = randomize_(Llava(cfg), 0)
    save_pretrained(model, tmp_path / "ckpt", processor)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
                    ).save(image)
    example = example_module()
    example.main(["--model", str(tmp_path / "ckpt"), "--image", str(image), "--prompt",
                  "What is it?", "--max-new-tokens", "6", "--report", "json"])
    report = json.loads(capsys.readouterr().out)
    inputs = processor(processor.format("What is it?"), [str(image)])
    want = generate(model.eval(), inputs["input_ids"], inputs["pixel_values"],
                    inputs["attention_mask"], max_new_tokens=6)
    assert report["answer"] == processor.decode(want.tokens[0, :int(want.lengths[0])])
    assert report["prompt_tokens"] == inputs["input_ids"].shape[1] and report["image_tokens"] == 16
    assert report["kv_bytes_saved"] == 0
    image.rename(tmp_path / "ckpt" / "img.png")
    (tmp_path / "ckpt" / "example.json").write_text(json.dumps({"image": "img.png",
                                                                "prompt": "What is it?"}))
    example.main(["--model", str(tmp_path / "ckpt"), "--max-new-tokens", "6", "--retained", "4",
                  "--skipped", "6", "--report", "json"])
    report = json.loads(capsys.readouterr().out)
    assert report["kv_bytes_saved"] == report["kv_bytes_prefill"] - report["kv_bytes"] > 0
    assert report["tokens_kept_in_cache"] == report["prefill_tokens"] - 6
    with pytest.raises(SystemExit) as e:
        example.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in FLAGS), [f for f in FLAGS if f not in text]
    err = cli_error(example.main, ["--model", str(tmp_path / "ckpt"), "--image",
                                   str(tmp_path / "no.png")], capsys)
    assert "does not exist or is not a file" in err
    (tmp_path / "ckpt" / "example.json").write_text(json.dumps({"image": "../img.png"}))
    assert "not a plain file name" in cli_error(example.main, ["--model", str(tmp_path / "ckpt")],
                                                capsys)
    example.SHIPPED = tmp_path / "checkpoints" / "tiny-llava"  # not there: say so, and what to do
    assert "does not exist yet; pass --model" in cli_error(example.main, [], capsys)


@pytest.mark.slow
def test_loading_300_mb_peaks_within_1_3x_its_file_size():
    """Fresh processes, VmHWM: load_pretrained stays near 1x; the naive loader (allocate,
    load_file, copy) needs about 2x, which shows the measurement can see a second copy."""
    report = example_module("bench_load_memory").main(["--mb", "300", "--naive"])
    assert report["file_bytes"] > 250e6
    assert report["load_pretrained"]["ratio"] <= 1.3, report
    assert report["naive"]["ratio"] > 1.3, report
