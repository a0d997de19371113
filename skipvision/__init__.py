"""skipvision: a plain PyTorch LLaVA, and Skip-Vision (ICCV 2025) as a small diff on it.

The model is the top level (config, vision, projector, llama, vlm, kv_cache, generate, skip);
`io` reads and writes checkpoints and inputs, `training` fine-tunes, `analysis` counts and
bounds. The names below are the public API.
"""
from .analysis import flops
from .config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from .generate import Generation, decode_step, generate, prefill, sample
from .io.hf_config import from_hf, to_hf
from .io.loading import load_pretrained
from .io.saving import save_pretrained
from .io.processor import Processor
from .kv_cache import KVCache
from .skip import PRESETS, SkipConfig
from .vlm import LMInput, Llava

__all__ = ["LlavaConfig", "RopeConfig", "TextConfig", "VisionConfig", "Generation", "decode_step",
           "generate", "prefill", "sample", "from_hf", "to_hf", "KVCache", "LMInput", "Llava",
           "load_pretrained", "save_pretrained", "Processor", "PRESETS", "SkipConfig", "flops"]
