"""LLaVA-NeXT checkpoints and processing end to end: transformers' processor, checkpoints in
both directions through an offline Hub cache, and examples/generate.py on one."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from helpers import (assert_close, build_hf_next, example_module, make_image, offline_cache,
                     publish)
from skipvision import LlavaConfig, Processor, TextConfig, VisionConfig, generate, load_pretrained
from skipvision.io.images import ImageProcessor
from skipvision.io.saving import save_pretrained
from tiny_tokenizer import as_transformers, tiny_tokenizer

TOK = tiny_tokenizer()
S, PATCH = 16, 4  # tiles of 16 pixels, 4 x 4 = 16 tokens a tile
PINS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]


def processors():
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=8, num_attention_heads=2, image_size=S,
                                          patch_size=PATCH),
                      text=TextConfig(vocab_size=TOK.get_vocab_size(), hidden_size=8,
                                      num_attention_heads=2, max_position_embeddings=4096),
                      image_token_id=TOK.token_to_id("<image>"), image_grid_pinpoints=PINS)
    hf_tok = as_transformers(TOK)
    hf_tok.padding_side = "left"
    image = LlavaNextImageProcessorPil(size={"shortest_edge": S}, image_grid_pinpoints=PINS,
                                       crop_size={"height": S, "width": S})
    theirs = LlavaNextProcessor(image_processor=image, tokenizer=hf_tok, patch_size=PATCH,
                                vision_feature_select_strategy="default",
                                num_additional_image_tokens=1)
    return Processor(cfg, TOK, ImageProcessor(S, (S, S))), theirs


@settings(max_examples=20)
@given(sizes=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 90)), min_size=1,
                      max_size=3), two=st.booleans(), seed=st.integers(0, 2**16))
def test_processor_batches_equal_llava_next_processor(sizes, two, seed):
    """Images of different sizes (so of different token counts) in one left-padded batch."""
    ours, theirs = processors()
    prompts = [f"USER: <image>\nwhat is {i}?" + (" and <image>" if two else "") + " ASSISTANT:"
               for i in range(len(sizes))]
    images = [make_image("RGB", w, h, seed + i) for i, (h, w) in enumerate(sizes)
              for _ in range(1 + two)]
    got = ours(prompts, images)
    want = theirs(text=prompts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert torch.equal(got["image_sizes"], want["image_sizes"])
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert (got["pixel_values"] - want["pixel_values"]).abs().max() <= 1e-5


def tiny_next(seed=0):
    """A transformers LLaVA-NeXT at 16-pixel tiles, float64 and exact (hf_float64)."""
    spec = dict(
        text=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                  vocab_size=TOK.get_vocab_size(), rms_norm_eps=1e-5, max_position_embeddings=512,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  tie_word_embeddings=False),
        vision=dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                    num_attention_heads=2, image_size=S, patch_size=PATCH),
        image_token_id=TOK.token_to_id("<image>"), vision_feature_layer=-2,
        image_grid_pinpoints=PINS)
    return build_hf_next(spec, seed)


def question(processor, image):
    return processor("USER: <image>\nwhat is it? ASSISTANT:", [image])


def test_checkpoints_round_trip_with_transformers_through_an_offline_hub_cache(tmp_path):
    hf = tiny_next()
    _, theirs = processors()
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")  # sharded, llava-hf layout
    theirs.save_pretrained(tmp_path / "theirs")
    assert len(list((tmp_path / "theirs").glob("model-*.safetensors"))) > 1
    publish(tmp_path / "cache", "org/tiny-next", tmp_path / "theirs")
    image = make_image("RGB", 37, 21, 0)
    with offline_cache(tmp_path / "cache"):
        ours, processor = load_pretrained("org/tiny-next", dtype="float64")
    inputs = question(processor, image)
    with torch.no_grad():
        want = hf(**(inputs | {"pixel_values": inputs["pixel_values"].double()})).logits
        got = ours(inputs["input_ids"], inputs["pixel_values"].double(), inputs["attention_mask"],
                   image_sizes=inputs["image_sizes"])
    assert_close(got, want, 1e-9 * max(1.0, want.abs().max().item()), "theirs -> ours")
    save_pretrained(ours, tmp_path / "ours", processor)
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)
    back = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours",
                                                             dtype=torch.float64)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())
    pixels = LlavaNextImageProcessorPil.from_pretrained(tmp_path / "ours")(
        images=[image], return_tensors="pt")["pixel_values"]
    assert (pixels - inputs["pixel_values"]).abs().max() <= 1e-5


def test_generate_example_on_a_tiny_next_checkpoint_from_an_offline_hub_cache(tmp_path, capsys):
    hf = tiny_next(1)
    _, theirs = processors()
    hf.save_pretrained(tmp_path / "repo")
    theirs.save_pretrained(tmp_path / "repo")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (21, 37, 3), dtype=np.uint8)
                    ).save(tmp_path / "repo" / "cat.png")
    (tmp_path / "repo" / "example.json").write_text(json.dumps({"image": "cat.png",
                                                                "prompt": "what is it?"}))
    commit = publish(tmp_path / "cache", "org/tiny-next", tmp_path / "repo")
    snapshot = tmp_path / "cache" / "models--org--tiny-next" / "snapshots" / commit
    with offline_cache(tmp_path / "cache"):
        example_module().main(["--model", "org/tiny-next", "--image", str(snapshot / "cat.png"),
                               "--prompt", "what is it?", "--max-new-tokens", "5", "--skip",
                               "none", "--report", "json", "--dtype", "float64"])
        plain = json.loads(capsys.readouterr().out)
        example_module().main(["--model", str(snapshot), "--max-new-tokens", "5",  # its example
                               "--skip", "sv-llava-hd-576-576", "--retained", "16",
                               "--skipped", "8", "--report", "json", "--dtype", "float64"])
        hd = json.loads(capsys.readouterr().out)
        model, processor = load_pretrained("org/tiny-next", dtype="float64")
    inputs = processor(processor.format("what is it?"), [tmp_path / "repo" / "cat.png"])
    want = generate(model, inputs["input_ids"], inputs["pixel_values"].double(),
                    inputs["attention_mask"], max_new_tokens=5, image_sizes=inputs["image_sizes"])
    assert plain["answer"] == processor.decode(want.tokens[0, :int(want.lengths[0])])
    n = int((inputs["input_ids"] == model.cfg.image_token_id).sum())
    assert plain["image_tokens"] == n and plain["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert hd["prefill_tokens"] == plain["prompt_tokens"] - n + 16 + 1 + 8 + 1
    assert hd["kv_bytes_saved"] > 0 and hd["flops"]["prefill"]["ratio"] < 1
    with pytest.raises(Exception, match="thumbnail"):  # the HD split needs the base's count
        generate(model, inputs["input_ids"], inputs["pixel_values"].double(),
                 inputs["attention_mask"], image_sizes=inputs["image_sizes"],
                 skip=__import__("skipvision").SkipConfig(retained=3, retain="thumbnail"))


@pytest.mark.parametrize("text_config,template,card", [  # the llava-hf model cards' prompts
    ({"model_type": "mistral", "sliding_window": None}, "mistral_instruct",
     "[INST] <image>\nWhat is shown in this image? [/INST]"),
    ({"model_type": "llama"}, "vicuna_next",
     "A chat between a curious human and an artificial intelligence assistant. The assistant "
     "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
     "What is shown in this image? ASSISTANT:"),
    ({"model_type": "llama", "vocab_size": 64064}, "chatml",
     "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is "
     "shown in this image?<|im_end|><|im_start|>assistant\n")])
def test_next_checkpoints_get_their_model_cards_chat_template(text_config, template, card):
    from skipvision.io.loading import _template
    config = {"model_type": "llava_next", "text_config": text_config}
    assert _template(config) == template
    ours, _ = processors()
    assert ours.format("What is shown in this image?", template) == card
