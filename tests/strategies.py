"""Hypothesis strategies shared by the test modules: tiny LLaVAs and Skip-Vision settings.

Structure is drawn (geometry, options, which layers skip); numbers come from a drawn seed.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from helpers import hf_specs, randomize_
from skipvision import Llava, LlavaConfig, SkipConfig, TextConfig, VisionConfig

lengths = st.lists(st.integers(0, 5), min_size=1, max_size=3)  # text tokens per batch row


@st.composite
def models(draw, summary_scorer=None, dtype=torch.float64):
    """(a tiny random Llava in `dtype`, eval mode; its seed). GQA, head_dim, biases, tied
    embeddings, feature layer, strategy and the summary scorer are drawn."""
    heads = draw(st.integers(1, 3), label="heads")
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]), label="kv")
    patch, grid = draw(st.integers(2, 4)), draw(st.integers(1, 5), label="grid")
    v_layers = draw(st.integers(1, 3))
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=8, intermediate_size=draw(st.sampled_from([12, 16])),
                            num_hidden_layers=v_layers, image_size=patch * grid,
                            num_attention_heads=draw(st.sampled_from([1, 2])), patch_size=patch),
        text=TextConfig(vocab_size=48, hidden_size=4 * heads,
                        intermediate_size=draw(st.sampled_from([12, 20])),
                        num_hidden_layers=draw(st.integers(1, 3), label="layers"),
                        num_attention_heads=heads, num_key_value_heads=kv,
                        head_dim=draw(st.sampled_from([None, 2, 6]), label="head_dim"),
                        attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()),
                        tie_word_embeddings=draw(st.booleans()), rms_norm_eps=1e-5),
        image_token_id=47, vision_feature_layer=draw(st.integers(1, v_layers), label="layer"),
        vision_feature_select_strategy=draw(st.sampled_from(["default", "full"])),
        summary_scorer=(draw(st.booleans(), label="scorer") if summary_scorer is None
                        else summary_scorer))
    seed = draw(st.integers(0, 2**16), label="seed")
    return randomize_(Llava(cfg), seed).to(dtype).eval(), seed


@st.composite
def skips(draw, cfg, **fixed):
    """A SkipConfig that fits `cfg` and keeps at least one token per image; `fixed` pins fields."""
    n, layers = cfg.image_seq_length, cfg.text.num_hidden_layers
    summary = fixed.get("summary", draw(st.booleans(), label="summary") and n >= 2)
    lo = int(summary)
    n_r = draw(st.integers(lo, n - lo), label="retained")
    n_s = draw(st.integers(max(lo, int(n_r == 0)), n - n_r), label="skipped")
    which = draw(st.none() | st.lists(st.integers(0, layers - 1), min_size=1, unique=True))
    kw = dict(retained=n_r, skipped=n_s, summary=summary, layers=which,
              mask=draw(st.sampled_from(["causal", "consistent"])),
              kv=draw(st.sampled_from(["evict", "keep"])),
              merge_order=draw(st.sampled_from(["redundancy", "spatial"])))
    kw.update(fixed)
    return SkipConfig(**kw)


GRIDS = [[(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)], [(1, 1)], [(2, 2), (1, 2)], [(2, 3), (1, 4)]]


@st.composite
def next_models(draw, dtype=torch.float64):
    """(a tiny random LLaVA-NeXT, its seed): `models` with tile grids (GRIDS, in tiles of the
    tower's size) and the 'default' strategy LLaVA-NeXT packs."""
    model, seed = draw(models(dtype=dtype))
    S = model.cfg.vision.image_size
    grid = draw(st.sampled_from(GRIDS), label="grid")
    cfg = model.cfg.replace(vision_feature_select_strategy="default",
                            image_grid_pinpoints=[[r * S, c * S] for r, c in grid])
    return randomize_(Llava(cfg), seed).to(dtype).eval(), seed


image_sizes = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=3)


@st.composite
def next_specs(draw):
    """hf_specs with tile grids (in tiles of the tower's size) and a LLaMA or Mistral LM."""
    spec = draw(hf_specs(max_layers=2))
    spec["vision_feature_select_strategy"] = "default"
    if spec["vision_feature_layer"] == 0:  # its negative twin: transformers 5.24's NeXT loses 0
        spec["vision_feature_layer"] = -(spec["vision"]["num_hidden_layers"] + 1)
    S = spec["vision"]["image_size"]
    spec["image_grid_pinpoints"] = [[r * S, c * S] for r, c in draw(st.sampled_from(GRIDS))]
    if draw(st.booleans(), label="mistral"):
        spec["text"].update(model_type="mistral", sliding_window=None)
    return spec
