"""Our LLaVA equals transformers' LlavaForConditionalGeneration on the same weights."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import assert_close, build_hf, hf_specs, llava_inputs, ours_from_hf
from skipvision import generate


@settings(max_examples=60)
@given(spec=hf_specs(), seed=st.integers(0, 2**16), lengths=st.lists(st.integers(0, 6), min_size=1,
                                                                       max_size=3))
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_logits_match_transformers(dtype, atol, spec, seed, lengths):
    hf = build_hf(spec, seed, dtype)
    ours = ours_from_hf(hf)
    ids, mask, pos, px = llava_inputs(ours.cfg, seed, lengths, dtype=dtype)
    with torch.no_grad():
        # output_hidden_states=True: transformers 5.24 loses the vision hidden states when
        # vision_feature_layer == 0 (it passes the index itself as the output flag).
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos,
                  output_hidden_states=True).logits
        got = ours(ids, px, mask, pos)
    valid = mask.bool()
    assert_close(got[valid], want[valid], atol * max(1.0, want.abs().max().item()), "logits")


@settings(max_examples=5)
@given(spec=hf_specs(max_layers=2), seed=st.integers(0, 2**16))
def test_greedy_generation_matches_transformers(spec, seed):
    """Batch of 3 prompts of different lengths, left-padded, 20 greedy tokens."""
    hf = build_hf(spec, seed, torch.float64)
    ours = ours_from_hf(hf)
    ids, mask, pos, px = llava_inputs(ours.cfg, seed, [2, 5, 9])
    eos = ours.cfg.text.vocab_size + 7  # never produced: all 20 tokens are compared
    layer = spec["vision_feature_layer"]  # 0 -> its negative twin (the transformers bug above)
    layer = layer if layer != 0 else -(spec["vision"]["num_hidden_layers"] + 1)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, do_sample=False,
                           max_new_tokens=20, min_new_tokens=20, eos_token_id=None,
                           pad_token_id=0, vision_feature_layer=layer)[:, ids.shape[1]:]
    got = generate(ours, ids, px, mask, max_new_tokens=20, eos_ids=[eos]).tokens
    assert torch.equal(got, want), f"\nours {got}\nhf   {want}"
