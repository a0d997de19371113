"""Read and write Hugging Face `config.json` dicts for LLaVA (llava-hf layout).

Hub configs are sparse: `llava-hf/llava-1.5-7b-hf` gives only five `text_config` fields and
omits `hidden_act` and `layer_norm_eps` from `vision_config` (SPEC.md section 1). Missing
fields take the defaults of the matching `transformers` config class, which are the
dataclass defaults in `config.py`; a missing `vision_config` takes `LlavaConfig`'s CLIP
ViT-L/14-336. Both RoPE spellings are read: `rope_theta` + `rope_scaling` (transformers 4)
and `rope_parameters` (transformers 5).
"""
from __future__ import annotations

import dataclasses

from .config import LlavaConfig, RopeConfig, TextConfig, VisionConfig

# transformers.LlavaConfig builds this CLIPVisionConfig when vision_config is absent.
LLAVA_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)


def _fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}


def rope_from_hf(text: dict) -> RopeConfig:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if "rope_type" in params or "rope_theta" in params or "type" in params:
        params = dict(params)
    else:  # per-layer-type dicts are not used by LLaMA
        params = {}
    theta = params.get("rope_theta", text.get("rope_theta", RopeConfig.theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kw = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings") if k in params}
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kw)


def text_from_hf(text: dict, tie: bool = False) -> TextConfig:
    kw = _fields(TextConfig, text)
    kw.pop("rope", None)
    kw["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", False) or tie)
    return TextConfig(rope=rope_from_hf(text), **kw)


def vision_from_hf(vision: dict | None) -> VisionConfig:
    return VisionConfig(**_fields(VisionConfig, LLAVA_DEFAULT_VISION if vision is None else vision))


def from_hf(d: dict) -> LlavaConfig:
    """A llava-hf `config.json` dict (any transformers version) -> LlavaConfig."""
    if d.get("model_type") not in (None, "llava"):
        raise ValueError(f"expected a llava config, got model_type {d.get('model_type')!r}")
    text = d.get("text_config") or {}
    kw = {}
    for ours, theirs in [("image_token_id", "image_token_id"), ("image_token_id", "image_token_index"),
                         ("vision_feature_layer", "vision_feature_layer"),
                         ("vision_feature_select_strategy", "vision_feature_select_strategy"),
                         ("projector_hidden_act", "projector_hidden_act"),
                         ("multimodal_projector_bias", "multimodal_projector_bias"),
                         ("summary", "skipvision_summary")]:
        if d.get(theirs) is not None:
            kw[ours] = d[theirs]
    return LlavaConfig(vision=vision_from_hf(d.get("vision_config")),
                       text=text_from_hf(text, tie=d.get("tie_word_embeddings", False)), **kw)


def to_hf(cfg: LlavaConfig, dtype: str | None = None) -> dict:
    """LlavaConfig -> a full llava-hf `config.json` dict that transformers reads too."""
    t, v, r = cfg.text, cfg.vision, cfg.text.rope
    rope = {"rope_type": r.rope_type, "rope_theta": r.theta}
    if r.rope_type != "default":
        rope["factor"] = r.factor
    if r.rope_type == "llama3":
        rope.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                    original_max_position_embeddings=r.original_max_position_embeddings)
    text = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name != "rope"}
    text.update(model_type="llama", rope_parameters=rope, rope_theta=r.theta,
                rope_scaling=None if r.rope_type == "default" else rope)
    if isinstance(text["eos_token_id"], tuple):
        text["eos_token_id"] = list(text["eos_token_id"])
    vision = dataclasses.asdict(v) | {"model_type": "clip_vision_model"}
    layer = cfg.vision_feature_layer
    out = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": text, "vision_config": vision,
        "image_token_id": cfg.image_token_id, "image_token_index": cfg.image_token_id,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector_hidden_act,
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "image_seq_length": cfg.image_seq_length,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    if cfg.summary:
        out["skipvision_summary"] = True
    if dtype is not None:
        out["torch_dtype"] = out["dtype"] = dtype
    return out
