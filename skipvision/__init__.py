"""skipvision: a plain PyTorch LLaVA, and Skip-Vision (ICCV 2025) as a small diff on it."""
from .config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from .generate import Generation, decode_step, generate, prefill, sample
from .hf_config import from_hf, to_hf
from .kv_cache import KVCache
from .loading import load_pretrained, save_pretrained
from .processor import Processor
from .vlm import LMInput, Llava

__all__ = ["LlavaConfig", "RopeConfig", "TextConfig", "VisionConfig", "Generation", "decode_step",
           "generate", "prefill", "sample", "from_hf", "to_hf", "KVCache", "LMInput", "Llava",
           "load_pretrained", "save_pretrained", "Processor"]
