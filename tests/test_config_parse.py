"""config.json parsing: the real llava-1.5-7b-hf config, sparse configs, original LLaVA configs."""
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from skipvision import Llava
from skipvision.io.hf_config import (checkpoint_dtype, from_hf, from_original, is_original,
                                  rope_from_hf, to_hf)
from skipvision.io.keys import map_key

# llava-hf/llava-1.5-7b-hf config.json, as published on the Hub (transformers 4.36).
LLAVA_15_7B_HF = """{
  "architectures": ["LlavaForConditionalGeneration"],
  "ignore_index": -100,
  "image_token_index": 32000,
  "model_type": "llava",
  "pad_token_id": 32001,
  "projector_hidden_act": "gelu",
  "text_config": {
    "_name_or_path": "lmsys/vicuna-7b-v1.5",
    "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "rms_norm_eps": 1e-05,
    "torch_dtype": "float16",
    "vocab_size": 32064
  },
  "tie_word_embeddings": false,
  "torch_dtype": "float16",
  "transformers_version": "4.36.0.dev0",
  "vision_config": {
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000
  },
  "vision_feature_layer": -2,
  "vision_feature_select_strategy": "default",
  "vocab_size": 32064
}"""

# liuhaotian/llava-v1.5-7b style and its CLIP repo's config (sparse).
ORIGINAL_7B = dict(architectures=["LlavaLlamaForCausalLM"], model_type="llava",
                   hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                   num_hidden_layers=32, num_key_value_heads=32, max_position_embeddings=4096,
                   rms_norm_eps=1e-05, vocab_size=32000, pad_token_id=0, torch_dtype="float16",
                   mm_vision_tower="openai/clip-vit-large-patch14-336",
                   mm_projector_type="mlp2x_gelu", mm_hidden_size=1024,
                   mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                   mm_use_im_start_end=False, mm_use_im_patch_token=False,
                   image_aspect_ratio="pad", mm_patch_merge_type="flat", tie_word_embeddings=False)
CLIP_L14_336 = dict(model_type="clip", vision_config=dict(
    hidden_size=1024, image_size=336, intermediate_size=4096, num_attention_heads=16,
    num_hidden_layers=24, patch_size=14, projection_dim=768))


def test_llava_15_7b_hf_config_parses_to_its_geometry():
    d = json.loads(LLAVA_15_7B_HF)
    cfg = from_hf(d)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim, t.intermediate_size) == (4096, 32, 32, 32, 128, 11008)
    assert (t.rms_norm_eps, t.rope.theta, t.rope.rope_type) == (1e-5, 10000.0, "default")
    assert (t.vocab_size, t.max_position_embeddings, t.tie_word_embeddings) == (32064, 4096, False)
    assert (t.hidden_act, t.pad_token_id, t.bos_token_id, t.eos_ids) == ("silu", 32001, 1, (2,))
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
            v.image_size, v.patch_size) == (1024, 24, 16, 4096, 336, 14)
    assert (v.hidden_act, v.layer_norm_eps, v.num_positions) == ("quick_gelu", 1e-5, 577)
    assert cfg.image_token_id == 32000 and cfg.projector_hidden_act == "gelu"
    assert cfg.feature_layers == (23,) and cfg.image_seq_length == 576
    assert checkpoint_dtype(d) == "float16"


def _shapes(model, mapped: bool) -> dict:
    out = {}
    for k, p in model.named_parameters(remove_duplicate=False):
        out[map_key(k) if mapped else k] = tuple(p.shape)
    return out


def test_meta_model_from_the_7b_config_has_transformers_parameters():
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    d = json.loads(LLAVA_15_7B_HF)
    with torch.device("meta"):
        ours = Llava(from_hf(d))
        theirs = LlavaForConditionalGeneration(LlavaConfig.from_dict(d))
    ours_shapes, their_shapes = _shapes(ours, False), _shapes(theirs, True)
    assert None not in their_shapes, "a transformers parameter has no name in keys.py"
    assert ours_shapes == their_shapes
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert 7.0e9 < n < 7.1e9  # "7B"


def test_to_hf_round_trips_and_transformers_reads_it():
    from transformers import LlavaConfig
    cfg = from_hf(json.loads(LLAVA_15_7B_HF))
    assert from_hf(to_hf(cfg)) == cfg
    assert from_hf(LlavaConfig.from_dict(to_hf(cfg)).to_dict()) == cfg


TEXT_FIELDS = dict(hidden_size=st.sampled_from([64, 128]), intermediate_size=st.integers(8, 99),
                   num_hidden_layers=st.integers(1, 40), num_attention_heads=st.sampled_from([4]),
                   num_key_value_heads=st.sampled_from([1, 2, 4]), rms_norm_eps=st.sampled_from(
                       [1e-5, 1e-6]), max_position_embeddings=st.integers(16, 9000),
                   vocab_size=st.integers(10, 50000), tie_word_embeddings=st.booleans(),
                   rope_theta=st.sampled_from([1e4, 5e5]), hidden_act=st.sampled_from(
                       ["silu", "gelu"]), bos_token_id=st.integers(0, 9),
                   eos_token_id=st.integers(0, 9))
VISION_FIELDS = dict(hidden_size=st.sampled_from([48, 96]), intermediate_size=st.integers(8, 99),
                     num_hidden_layers=st.integers(1, 30), num_attention_heads=st.sampled_from(
                         [2, 4]), image_size=st.sampled_from([224, 336]),
                     patch_size=st.sampled_from([14, 16, 32]),
                     layer_norm_eps=st.sampled_from([1e-5, 1e-6]))


@st.composite
def sparse_configs(draw):
    def subset(fields):
        keep = draw(st.lists(st.sampled_from(sorted(fields)), unique=True))
        return {k: draw(fields[k], label=k) for k in keep}
    text, vision = subset(TEXT_FIELDS), subset(VISION_FIELDS)
    if draw(st.booleans(), label="rope_parameters"):  # the transformers 5 spelling
        text["rope_parameters"] = {"rope_type": "default",
                                   "rope_theta": text.pop("rope_theta", 1e4)}
    d = {"model_type": "llava", "text_config": {"model_type": "llama", **text}}
    if draw(st.booleans(), label="has_vision"):
        d["vision_config"] = {"model_type": "clip_vision_model", **vision}
        if (vision.get("image_size", 224) % vision.get("patch_size", 32)) != 0:
            d["vision_config"]["patch_size"] = 16
    return d


@settings(max_examples=40)
@given(d=sparse_configs())
def test_sparse_configs_take_the_transformers_class_defaults(d):
    """Missing fields mean 'the transformers default': parsing the sparse dict gives what
    parsing transformers' completed dict gives."""
    from transformers import LlavaConfig
    full = LlavaConfig.from_dict(json.loads(json.dumps(d))).to_dict()
    assert from_hf(d) == from_hf(full)


def test_rope_spellings_agree():
    old = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}}
    new = {"rope_parameters": {"rope_theta": 5e5, **old["rope_scaling"]}}
    older = {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_from_hf(old) == rope_from_hf(new)
    assert rope_from_hf(older).rope_type == "linear" and rope_from_hf(older).factor == 2.0
    assert checkpoint_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert checkpoint_dtype({"text_config": {"torch_dtype": "float16"}}) == "float16"
    assert checkpoint_dtype({}) is None


def test_original_llava_config_parses_with_its_clip_repo():
    assert is_original(ORIGINAL_7B) and not is_original(json.loads(LLAVA_15_7B_HF))
    cfg = from_original(ORIGINAL_7B, CLIP_L14_336)
    hf_cfg = from_hf(json.loads(LLAVA_15_7B_HF))
    assert cfg.image_token_id == -200 and cfg.text.vocab_size == 32000
    same = dict(vocab_size=hf_cfg.text.vocab_size, pad_token_id=hf_cfg.text.pad_token_id)
    assert dataclasses.replace(cfg.text, **same) == hf_cfg.text
    assert cfg.vision == hf_cfg.vision
    assert cfg.replace(image_token_id=32000, text=hf_cfg.text) == hf_cfg
    flat = from_original(ORIGINAL_7B, CLIP_L14_336["vision_config"] | {
        "model_type": "clip_vision_model"})
    assert flat == cfg
    full = from_original(ORIGINAL_7B | {"mm_vision_select_feature": "cls_patch"}, CLIP_L14_336)
    assert full.vision_feature_select_strategy == "full" and full.image_seq_length == 577


@pytest.mark.parametrize("change,message", [
    ({"mm_projector_type": "linear"}, "mm_projector_type 'linear' is not supported"),
    ({"image_aspect_ratio": "anyres"}, "anyres"),
    ({"mm_use_im_start_end": True}, "LLaVA-1.0"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls'"),
    ({"mm_hidden_size": 768}, "mm_hidden_size 768 does not match"),
])
def test_unsupported_original_configs_say_why(change, message):
    with pytest.raises(ValueError, match=message):
        from_original(ORIGINAL_7B | change, CLIP_L14_336)


@pytest.mark.parametrize("d,message", [
    ({"model_type": "bert"}, "expected a llava or llava_next config, got model_type 'bert'"),
    ({"model_type": "llava", "text_config": {"model_type": "qwen2"}}, "'qwen2' is not supported"),
    ({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}},
     "'siglip_vision_model' is not supported"),
])
def test_other_model_types_are_refused(d, message):
    with pytest.raises(ValueError, match=message):
        from_hf(d)
