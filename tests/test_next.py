"""LLaVA-NeXT (any-resolution tiles) against transformers' LlavaNextForConditionalGeneration
and LlavaNextProcessor on the same weights and images."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import assert_close, build_hf_next, make_image, next_inputs, ours_from_hf
from skipvision import anyres, generate
from skipvision.io.images import ImageProcessor
from next_configs import NEXT_PINS, REAL
from strategies import GRIDS, image_sizes, next_specs

@settings(max_examples=50)
@given(spec=next_specs(), seed=st.integers(0, 2**16), sizes=image_sizes, data=st.data())
def test_logits_match_transformers_llava_next(spec, seed, sizes, data):
    hf = build_hf_next(spec, seed)
    ours = ours_from_hf(hf)
    lengths = data.draw(st.lists(st.integers(0, 6), min_size=len(sizes), max_size=len(sizes)))
    ids, mask, pos, px, hw = next_inputs(ours.cfg, seed, lengths, sizes)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, image_sizes=hw, attention_mask=mask,
                  position_ids=pos, output_hidden_states=True).logits
        got = ours(ids, px, mask, pos, image_sizes=hw)
    valid = mask.bool()
    assert_close(got[valid], want[valid], 1e-9 * max(1.0, want.abs().max().item()), "logits")


@settings(max_examples=4)
@given(spec=next_specs(), seed=st.integers(0, 2**16))
def test_greedy_generation_matches_transformers_llava_next(spec, seed):
    hf = build_hf_next(spec, seed)
    ours = ours_from_hf(hf)
    ids, mask, pos, px, hw = next_inputs(ours.cfg, seed, [2, 5, 0], [(20, 50), (50, 9), (8, 8)])
    layer = spec["vision_feature_layer"]
    with torch.no_grad():
        want = hf.generate(input_ids=ids, pixel_values=px, image_sizes=hw, attention_mask=mask,
                           do_sample=False, max_new_tokens=20, min_new_tokens=20,
                           eos_token_id=None, pad_token_id=0,
                           vision_feature_layer=layer)[:, ids.shape[1]:]
    eos = ours.cfg.text.vocab_size + 7  # never produced: all 20 tokens are compared
    got = generate(ours, ids, px, mask, max_new_tokens=20, eos_ids=[eos], image_sizes=hw).tokens
    assert torch.equal(got, want), f"\nours {got}\nhf   {want}"


@settings(max_examples=30)
@given(w=st.integers(1, 400), h=st.integers(1, 400), grid=st.sampled_from(GRIDS),
       mode=st.sampled_from(["RGB", "RGBA", "L", "P"]), seed=st.integers(0, 2**16))
def test_processor_equals_transformers_llava_next_processor(w, h, grid, mode, seed):
    """Pixel values within 1e-5 and the same number of image tokens, at 32-pixel tiles."""
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
    from skipvision import LlavaConfig, VisionConfig
    S = 32
    pins = [[r * S, c * S] for r, c in grid]
    cfg = LlavaConfig(vision=VisionConfig(image_size=S, patch_size=8, hidden_size=8,
                                          num_attention_heads=2), image_grid_pinpoints=pins)
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                    image_grid_pinpoints=pins)
    im = make_image(mode, w, h, seed)
    want = hf(images=[im], return_tensors="pt")
    got = ImageProcessor(S, (S, S)).anyres(im, cfg.image_grid_pinpoints)
    assert got.shape == want["pixel_values"][0].shape
    assert (got - want["pixel_values"][0]).abs().max().item() <= 1e-5
    counter = LlavaNextProcessor.__new__(LlavaNextProcessor)  # only its token arithmetic
    counter.image_processor, counter.patch_size = hf, 8
    counter.num_additional_image_tokens, counter.vision_feature_select_strategy = 1, "default"
    n = counter._get_number_of_features(h, w, S, S) - 1
    assert anyres.image_tokens(cfg, h, w) == n


@pytest.mark.parametrize("repo", sorted(REAL))
def test_the_real_next_configs_build_transformers_parameters_on_meta(repo):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from skipvision import Llava, from_hf
    from skipvision.io.keys import map_key
    d = REAL[repo]
    with torch.device("meta"):
        ours = Llava(from_hf(d))
        theirs = LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(d))
    shapes = lambda m, f: {f(k): tuple(p.shape) for k, p in m.named_parameters()}  # noqa: E731
    assert shapes(ours, str) == shapes(theirs, map_key)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) and 7.0e9 < n < 7.7e9
    cfg = ours.cfg
    assert cfg.image_grid_pinpoints == tuple(map(tuple, NEXT_PINS)) and cfg.image_seq_length == 576
    if "mistral" in repo:
        assert cfg.text.num_key_value_heads == 8 and cfg.text.rope.theta == 1e6
        with pytest.raises(ValueError, match="sliding_window 4096"):
            from_hf({**d, "text_config": {**d["text_config"], "sliding_window": 4096}})
    # a 640 x 480 photo: 2 x 2 tiles of 672 x 672 (a 48 x 48 grid), 36 rows after unpadding
    assert anyres.tile_grid(cfg, 480, 640) == (2, 2)
    assert anyres.image_tokens(cfg, 480, 640) == 576 + 36 * (48 + 1)


def test_next_refuses_the_full_strategy_it_cannot_pack():
    """transformers' packing fails with CLS kept; here the config says so before anything."""
    from skipvision import from_hf
    d = {**REAL["llava-hf/llava-v1.6-vicuna-7b-hf"], "vision_feature_select_strategy": "full"}
    with pytest.raises(ValueError, match="must be 'default'"):
        from_hf(d)
