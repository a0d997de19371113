"""Read and write Hugging Face `config.json` dicts for LLaVA: llava-hf and original LLaVA.

Hub configs are sparse: `llava-hf/llava-1.5-7b-hf` gives only five `text_config` fields and
omits `hidden_act` and `layer_norm_eps` from `vision_config`. Missing
fields take the defaults of the matching `transformers` config class, which are the
dataclass defaults in `config.py`; a missing `vision_config` takes `LlavaConfig`'s CLIP
ViT-L/14-336. Both RoPE spellings are read: `rope_theta` + `rope_scaling` (transformers 4)
and `rope_parameters` (transformers 5); both dtype spellings: `torch_dtype` and `dtype`.

The original LLaVA format (`liuhaotian/llava-v1.5-7b`) is a flat `LlamaConfig` plus `mm_*`
fields; its vision geometry lives in the CLIP repo named by `mm_vision_tower`.
"""
from __future__ import annotations

import dataclasses

from ..config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from ..errors import ConfigError

# transformers.LlavaConfig builds this CLIPVisionConfig when vision_config is absent.
LLAVA_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)
TEXT_MODEL_TYPES = (None, "llama", "mistral")  # the decoder in llama.py
# transformers.MistralConfig's defaults where they differ from LlamaConfig's; Mistral is LLaMA
# with a sliding window, which is loaded only where it never slides (null, as in
# llava-v1.6-mistral-7b-hf, or at least the context)
MISTRAL_DEFAULTS = dict(intermediate_size=14336, num_key_value_heads=8,
                        max_position_embeddings=4096 * 32, sliding_window=4096)
VISION_MODEL_TYPES = (None, "clip_vision_model")  # the tower in vision.py

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ORIGINAL_IMAGE_TOKEN = -200  # IMAGE_TOKEN_INDEX of the original LLaVA code: not a vocab id
ORIGINAL_FEATURES = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature
ORIGINAL_PROJECTORS = {"mlp2x_gelu": "gelu"}  # mm_projector_type -> projector activation
ORIGINAL_ASPECT = (None, "square", "pad")  # image_aspect_ratio values we implement


def _fields(cls, d: dict) -> dict:
    """The entries of `d` that are fields of `cls`; an explicit null stays (the dataclass
    refuses it where the field is not optional: null is not "missing")."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _need(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def _object(d: dict, key: str, where: str = "") -> dict:
    """d[key] as a dict ({} when absent or null); ConfigError when it is something else."""
    v = d.get(key)
    _need(v is None or isinstance(v, dict), f"{where}{key} must be an object, got {v!r}")
    return v or {}


def checkpoint_dtype(d: dict) -> str | None:
    """The dtype the weights were saved in (`dtype`, or the older `torch_dtype`), or None."""
    for where in (d, d.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(where.get(key), str):
                return where[key]
    return None


def rope_from_hf(text: dict) -> RopeConfig:
    new, old = (_object(text, k, "text_config.") for k in ("rope_parameters", "rope_scaling"))
    params = new or old
    if "rope_type" in params or "rope_theta" in params or "type" in params:
        params = dict(params)
    else:  # per-layer-type dicts are not used by LLaMA
        params = {}
    theta = params.get("rope_theta", text.get("rope_theta", RopeConfig.theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kw = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings") if k in params}
    return RopeConfig(theta=theta, rope_type=rope_type, **kw)


def text_from_hf(text: dict, tie: bool = False) -> TextConfig:
    """`tie`: the top-level tie_word_embeddings, used when text_config does not say."""
    if text.get("model_type") == "mistral":
        text = MISTRAL_DEFAULTS | text
        window, context = text["sliding_window"], text["max_position_embeddings"]
        _need(window is None or (type(window) is int and type(context) is int
                                 and window >= context),
              f"text_config.sliding_window {window!r}: sliding-window attention is not "
              f"implemented; only null (or a window of the whole context, {context}) loads")
    kw = _fields(TextConfig, text)
    kw.pop("rope", None)
    kw["tie_word_embeddings"] = text.get("tie_word_embeddings", tie)
    return TextConfig(rope=rope_from_hf(text), **kw)


def vision_from_hf(vision: dict | None) -> VisionConfig:
    return VisionConfig(**_fields(VisionConfig, LLAVA_DEFAULT_VISION if vision is None else vision))


def from_hf(d: dict) -> LlavaConfig:
    """A llava-hf `config.json` dict (any transformers version) -> LlavaConfig."""
    _need(d.get("model_type") in (None, "llava", "llava_next"),
          f"expected a llava or llava_next config, got model_type {d.get('model_type')!r}")
    text = dict(_object(d, "text_config"))
    vision = None if d.get("vision_config") is None else _object(d, "vision_config")
    _need(text.get("model_type") in TEXT_MODEL_TYPES,
          f"text_config.model_type {text.get('model_type')!r} is not supported: the language "
          "model here is LLaMA-architecture only")
    _need(vision is None or vision.get("model_type") in VISION_MODEL_TYPES,
          f"vision_config.model_type {(vision or {}).get('model_type')!r} is not supported: the "
          "vision tower here is a CLIP ViT")
    if text.get("pad_token_id") is None and d.get("pad_token_id") is not None:
        text["pad_token_id"] = d["pad_token_id"]  # llava-1.5-7b-hf keeps it at the top level
    kw = {}
    for ours, theirs in [("image_token_id", "image_token_id"),
                         ("image_token_id", "image_token_index"),
                         ("vision_feature_layer", "vision_feature_layer"),
                         ("vision_feature_select_strategy", "vision_feature_select_strategy"),
                         ("projector_hidden_act", "projector_hidden_act"),
                         ("multimodal_projector_bias", "multimodal_projector_bias"),
                         ("summary_scorer", "skipvision_summary")]:
        if d.get(theirs) is not None:
            kw[ours] = d[theirs]
    if d.get("model_type") == "llava_next":  # transformers.LlavaNextConfig's default grid
        kw["image_grid_pinpoints"] = d.get("image_grid_pinpoints") or NEXT_PINPOINTS
    return LlavaConfig(vision=vision_from_hf(vision),
                       text=text_from_hf(text, tie=d.get("tie_word_embeddings") or False), **kw)


def is_original(d: dict) -> bool:
    """True for the original LLaVA format (LlavaLlamaForCausalLM with `mm_*` fields)."""
    return "mm_vision_tower" in d or "mm_projector_type" in d


def clip_vision_dict(clip: dict) -> dict:
    """The vision part of a CLIP repo's config.json (`clip` or `clip_vision_model`)."""
    if clip.get("model_type") == "clip":
        return _object(clip, "vision_config") or _object(clip, "vision_config_dict")
    _need(clip.get("model_type") in VISION_MODEL_TYPES,
          f"the vision tower config has model_type {clip.get('model_type')!r}; expected a CLIP "
          "repo ('clip' or 'clip_vision_model')")
    return clip


def from_original(d: dict, clip: dict) -> LlavaConfig:
    """An original-LLaVA `config.json` plus its CLIP repo's `config.json` -> LlavaConfig.

    The prompt's image placeholder is the sentinel -200; `image_aspect_ratio` concerns the
    processor, not the model.
    """
    _need(d.get("model_type") in ("llava", "llava_llama"),
          f"expected an original LLaVA config (model_type 'llava'), got {d.get('model_type')!r}")
    kind = d.get("mm_projector_type", "linear")
    _need(kind in ORIGINAL_PROJECTORS, f"mm_projector_type {kind!r} is not supported; "
          f"supported: {sorted(ORIGINAL_PROJECTORS)} (LLaVA-1.5)")
    feature = d.get("mm_vision_select_feature", "patch")
    _need(feature in ORIGINAL_FEATURES, f"mm_vision_select_feature {feature!r} is not supported; "
          f"supported: {sorted(ORIGINAL_FEATURES)}")
    _need(not d.get("mm_use_im_start_end") and not d.get("mm_use_im_patch_token"),
          "mm_use_im_start_end / mm_use_im_patch_token checkpoints (LLaVA-1.0) are not supported")
    _need(d.get("mm_patch_merge_type", "flat") == "flat" and d.get("image_aspect_ratio")
          in ORIGINAL_ASPECT, f"image_aspect_ratio {d.get('image_aspect_ratio')!r} / "
          f"mm_patch_merge_type {d.get('mm_patch_merge_type')!r} (LLaVA-NeXT 'anyres') "
          "are not supported; LLaVA-1.5 uses 'pad' and 'flat'")
    vision = vision_from_hf(clip_vision_dict(clip))
    mm_hidden = d.get("mm_hidden_size")
    _need(mm_hidden in (None, vision.hidden_size), f"mm_hidden_size {mm_hidden} does not match "
          f"the CLIP tower's hidden_size {vision.hidden_size}")
    return LlavaConfig(vision=vision, text=text_from_hf(d), image_token_id=ORIGINAL_IMAGE_TOKEN,
                       vision_feature_layer=d.get("mm_vision_select_layer", -2),
                       vision_feature_select_strategy=ORIGINAL_FEATURES[feature],
                       projector_hidden_act=ORIGINAL_PROJECTORS[kind],
                       summary_scorer=d.get("skipvision_summary", False))


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
    next_ = cfg.image_grid_pinpoints is not None
    out = {
        "architectures": ["LlavaNextForConditionalGeneration" if next_ else
                          "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if next_ else "llava",
        "text_config": text, "vision_config": vision,
        "image_token_id": cfg.image_token_id, "image_token_index": cfg.image_token_id,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector_hidden_act,
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "image_seq_length": cfg.image_seq_length,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    if cfg.summary_scorer:
        out["skipvision_summary"] = True
    if next_:
        out["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    if dtype is not None:
        out["torch_dtype"] = out["dtype"] = dtype
    return out
