"""Configuration dataclasses for a LLaVA model: CLIP vision tower, projector, LLaMA decoder.

Field names and defaults follow the Hugging Face `CLIPVisionConfig`, `LlamaConfig` and
`LlavaConfig` classes, because Hub `config.json` files are sparse: a missing field means
"the default of that class". `LlavaConfig.from_hf` reads such a dict;
`to_hf` writes one that both this package and `transformers` read back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu", "relu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT; defaults are `transformers.CLIPVisionConfig`'s (ViT-B/32 at 224 px)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"  # CLIP's x * sigmoid(1.702 x)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"vision hidden_size {self.hidden_size} is not divisible by "
               f"num_attention_heads {self.num_attention_heads}")
        _check(self.image_size % self.patch_size == 0,
               f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _check(self.hidden_act in ACTIVATIONS, f"unknown vision hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # + CLS


@dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies: `rope_theta` plus the scaling types LLaVA checkpoints use."""
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        _check(self.rope_type in ROPE_TYPES,
               f"unsupported rope type {self.rope_type!r}; supported: {ROPE_TYPES}")
        _check(self.theta > 0 and self.factor > 0, "rope theta and factor must be positive")
        if self.rope_type == "llama3":
            _check(self.high_freq_factor > self.low_freq_factor,
                   "llama3 rope needs high_freq_factor > low_freq_factor")


@dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder; defaults are `transformers.LlamaConfig`'s (LLaMA-2-7B)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6  # LlamaConfig default; llava-1.5 sets 1e-5 in its config
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               f"num_attention_heads {self.num_attention_heads} is not a multiple of "
               f"num_key_value_heads {self.num_key_value_heads}")
        _check(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        _check(self.hidden_act in ACTIVATIONS, f"unknown text hidden_act {self.hidden_act!r}")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)


@dataclass(frozen=True)
class LlavaConfig:
    """LLaVA = vision tower + 2-layer MLP projector + LLaMA; defaults are llava-1.5's."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2  # index into CLIP's hidden_states tuple
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    projector_hidden_act: str = "gelu"  # exact (erf) GELU
    multimodal_projector_bias: bool = True
    summary_scorer: bool = False  # the Skip-Vision summary-token scorer exists (paper)

    def __post_init__(self):
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        n = self.vision.num_hidden_layers
        for i in self.feature_layers:
            _check(-(n + 1) <= i <= n, f"vision_feature_layer {i} is out of range for a vision "
                   f"tower with {n} layers (hidden_states has {n + 1} entries)")
        _check(self.vision_feature_select_strategy in ("default", "full"),
               f"vision_feature_select_strategy must be 'default' or 'full', "
               f"got {self.vision_feature_select_strategy!r}")
        _check(self.projector_hidden_act in ACTIVATIONS,
               f"unknown projector_hidden_act {self.projector_hidden_act!r}")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Non-negative indices into hidden_states (0 = embeddings, i = after layer i)."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else layers
        n = self.vision.num_hidden_layers + 1
        return tuple(i % n for i in layers)

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image: the patches, plus CLS with strategy 'full'."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    def replace(self, **changes) -> "LlavaConfig":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str):
    if not ok:
        raise ValueError(message)
