"""examples/generate.py end to end with a paper preset on a tiny random LLaVA of 256 image tokens."""
import json

import numpy as np
import torch
from PIL import Image

from helpers import SHIPPED, example_module, randomize_
from skipvision import Llava, LlavaConfig, Processor, TextConfig, VisionConfig, flops, generate
from skipvision.io.saving import save_pretrained
from skipvision.io.images import ImageProcessor
from skipvision.skip import PRESETS, SkipConfig
from tiny_tokenizer import tiny_tokenizer


def test_generate_example_with_the_100_156_preset_reports_the_savings(tmp_path, capsys):
    tok = tiny_tokenizer()
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, num_attention_heads=2,
                                          num_hidden_layers=2, image_size=64, patch_size=4,
                                          intermediate_size=32),  # 16 x 16 = 256 patches
                      text=TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, intermediate_size=64,
                                      max_position_embeddings=512),
                      image_token_id=tok.token_to_id("<image>"))
    processor = Processor(cfg, tok, ImageProcessor(size=64, crop=(64, 64)))
    model = randomize_(Llava(cfg), 1).eval()
    save_pretrained(model, tmp_path / "ckpt", processor)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)
                    ).save(image)
    args = ["--model", str(tmp_path / "ckpt"), "--image", str(image), "--prompt", "What is it?",
            "--max-new-tokens", "8", "--report", "json", "--device", "cpu"]
    example_module().main(args + ["--skip", "sv-llava-100-156"])
    report = json.loads(capsys.readouterr().out)

    skip = PRESETS["sv-llava-100-156"]
    inputs = processor(processor.format("What is it?"), [str(image)])
    want = generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                    max_new_tokens=8, skip=skip)
    assert report["answer"] == processor.decode(want.tokens[0, :int(want.lengths[0])])
    n_text = inputs["input_ids"].shape[1] - 256
    assert report["prefill_tokens"] == n_text + 100 + 1 + 156 + 1  # [retained][q1][skipped][q2]
    assert report["tokens_kept_in_cache"] == report["prefill_tokens"] - 156
    assert report["kv_bytes_saved"] == report["kv_bytes_prefill"] - report["kv_bytes"] > 0
    want_flops = flops.compare(cfg, n_text, 1, skip, 8, torch.float32)
    assert report["flops"]["prefill"]["skip"] == want_flops["prefill"]["skip"]
    assert report["flops"]["prefill"]["ratio"] == want_flops["prefill"]["ratio"] < 1


def test_generate_with_no_arguments_answers_the_shipped_sample_both_ways(capsys):
    """`python examples/generate.py`: the shipped model, its sample image and question, answered
    without and then with the checkpoint's own Skip-Vision settings (what the recipe recorded)."""
    example_module().main(["--report", "json", "--device", "cpu"])
    plain, skip = json.loads(capsys.readouterr().out)
    report = json.loads((SHIPPED / "training_report.json").read_text())
    assert plain["question"] == skip["question"] == report["sample"]["question"]
    assert plain["answer"] == report["sample"]["answers"]["plain"]
    assert skip["answer"] == report["sample"]["answers"]["skip_vision"]
    assert plain["skip"] is None and SkipConfig(**skip["skip"]) == SkipConfig(**report["skip"])
    sk = report["skip"]
    assert skip["prefill_tokens"] == plain["prefill_tokens"] - 144 + sk["retained"] + sk[
        "skipped"] + 2
    assert skip["tokens_kept_in_cache"] == skip["prefill_tokens"] - sk["skipped"]


def test_skip_flags_with_the_shipped_model_change_only_the_skip_vision_pass(capsys):
    example_module().main(["--report", "json", "--device", "cpu", "--retained", "20"])
    plain, skip = json.loads(capsys.readouterr().out)
    assert plain["skip"] is None and plain["prefill_tokens"] == plain["prompt_tokens"]
    assert skip["skip"]["retained"] == 20
