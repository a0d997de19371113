"""Configuration dataclasses for a LLaVA model: CLIP vision tower, projector, LLaMA decoder.

Field names and defaults follow the Hugging Face `CLIPVisionConfig`, `LlamaConfig` and
`LlavaConfig` classes, because Hub `config.json` files are sparse: a missing field means
"the default of that class" (io/hf_config.py reads and writes such files).

Every field is checked for its type and range when a config is made, before any weight is
allocated; a bad value raises ConfigError naming the key as config.json spells it. The upper
limits are far above any released checkpoint: they only stop a corrupt file from building a
model for minutes before failing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import check_fields, require

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu", "relu")
ROPE_TYPES = ("default", "linear", "llama3")
WIDTH, LAYERS, VOCAB, CONTEXT = 1 << 18, 1024, 1 << 22, 1 << 24  # sanity limits (see above)


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
        check_fields(self, "vision_config.", dict(
            hidden_size=("int", (1, WIDTH)), intermediate_size=("int", (1, WIDTH)),
            num_hidden_layers=("int", (1, LAYERS)), num_attention_heads=("int", (1, WIDTH)),
            num_channels=("int", (1, 16)), image_size=("int", (1, 1 << 14)),
            patch_size=("int", (1, 1 << 14)), hidden_act=("str", ACTIVATIONS),
            layer_norm_eps=("num", (0, 1))))
        require(self.hidden_size % self.num_attention_heads == 0,
               f"vision_config.hidden_size {self.hidden_size} is not divisible by "
               f"num_attention_heads {self.num_attention_heads}")
        require(self.image_size % self.patch_size == 0, f"vision_config.image_size "
               f"{self.image_size} is not a multiple of patch_size {self.patch_size}")

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
        check_fields(self, "text_config.rope_parameters.", dict(
            theta=("num", (1e-3, 1e15)), rope_type=("str", ROPE_TYPES),
            factor=("num", (1e-6, 1e6)), low_freq_factor=("num", (0, 1e6)),
            high_freq_factor=("num", (0, 1e6)),
            original_max_position_embeddings=("int", (1, CONTEXT))))
        if self.rope_type == "llama3":
            require(self.high_freq_factor > self.low_freq_factor,
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
        ids = ("int?", (-1, VOCAB))
        check_fields(self, "text_config.", dict(
            vocab_size=("int", (1, VOCAB)), hidden_size=("int", (1, WIDTH)),
            intermediate_size=("int", (1, WIDTH)), num_hidden_layers=("int", (1, LAYERS)),
            num_attention_heads=("int", (1, WIDTH)), num_key_value_heads=("int?", (1, WIDTH)),
            head_dim=("int?", (2, WIDTH)), hidden_act=("str", ACTIVATIONS),
            rms_norm_eps=("num", (0, 1)), max_position_embeddings=("int", (1, CONTEXT)),
            tie_word_embeddings=("bool", ()), attention_bias=("bool", ()),
            mlp_bias=("bool", ()), bos_token_id=ids, pad_token_id=ids))
        require(isinstance(self.rope, RopeConfig), "text_config.rope must be a RopeConfig")
        if isinstance(self.eos_token_id, (list, tuple)):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
        require(self.eos_token_id is None or all(
            isinstance(e, int) and not isinstance(e, bool) and -1 <= e <= VOCAB for e in eos),
            f"text_config.eos_token_id must be an integer, a list of them or null, got "
            f"{self.eos_token_id!r}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        require(self.num_attention_heads % self.num_key_value_heads == 0,
               f"text_config.num_attention_heads {self.num_attention_heads} is not a multiple "
               f"of num_key_value_heads {self.num_key_value_heads}")
        require(self.head_dim >= 2 and self.head_dim % 2 == 0,
               f"text_config.head_dim {self.head_dim} must be even (RoPE rotates pairs)")

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
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT: (H, W)s

    def __post_init__(self):
        require(isinstance(self.vision, VisionConfig) and isinstance(self.text, TextConfig),
               "LlavaConfig needs a VisionConfig and a TextConfig")
        check_fields(self, "", dict(
            image_token_id=("int", (-(1 << 31), VOCAB)),
            vision_feature_select_strategy=("str", ("default", "full")),
            projector_hidden_act=("str", ACTIVATIONS), multimodal_projector_bias=("bool", ()),
            summary_scorer=("bool", ())))
        grid, S = self.image_grid_pinpoints, self.vision.image_size
        if grid is not None:  # LLaVA-NeXT: candidate resolutions, whole tiles of the tower's size
            require(isinstance(grid, (list, tuple)) and len(grid) > 0 and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(
                    type(v) is int and 0 < v <= 1 << 14 and v % S == 0 for v in p) for p in grid),
                f"image_grid_pinpoints must be a list of [height, width] pairs, multiples of the "
                f"vision image_size {S}, got {grid!r}")
            object.__setattr__(self, "image_grid_pinpoints", tuple(tuple(p) for p in grid))
            require(self.vision_feature_select_strategy == "default", "LLaVA-NeXT packs the "
                   "patch features of its tiles: vision_feature_select_strategy must be 'default'")
        layers = self.vision_feature_layer
        if isinstance(layers, list):
            object.__setattr__(self, "vision_feature_layer", layers := tuple(layers))
        n = self.vision.num_hidden_layers
        require(isinstance(layers, (int, tuple)) and len(self.raw_feature_layers) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and -(n + 1) <= i <= n
            for i in self.raw_feature_layers),
            f"vision_feature_layer must be an integer (or a list of them) in [{-(n + 1)}, {n}] "
            f"for a vision tower of {n} layers (hidden_states has {n + 1} entries), got {layers!r}")

    @property
    def raw_feature_layers(self) -> tuple:
        layers = self.vision_feature_layer
        return (layers,) if not isinstance(layers, tuple) else layers

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Non-negative indices into hidden_states (0 = embeddings, i = after layer i)."""
        n = self.vision.num_hidden_layers + 1
        return tuple(i % n for i in self.raw_feature_layers)

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image: the patches, plus CLS with strategy 'full'."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    def replace(self, **changes) -> "LlavaConfig":
        return dataclasses.replace(self, **changes)
