"""The GGUF reader: RoPE row order (fast), and the real SmolLM2-135M weights (marker `real`)."""
import math

import pytest
import torch

from skipvision.io import gguf
from skipvision.config import TextConfig
from skipvision.llama import apply_rope, rope_cos_sin


def interleaved_rope(x, pos, theta):
    """llama.cpp's RoPE: rotate the pairs (2i, 2i+1) by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    ang = pos[:, None].double() * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x0 * ang.cos() - x1 * ang.sin(), x0 * ang.sin() + x1 * ang.cos()], -1)
    return out.flatten(-2)


def test_unpermute_inverts_permute_and_matches_interleaved_rope():
    """Scores from GGUF-order weights with interleaved RoPE equal scores from un-permuted
    weights with our rotate-half RoPE."""
    g = torch.Generator().manual_seed(0)
    H, D, C, T = 3, 8, 5, 6
    cfg = TextConfig(hidden_size=C, num_attention_heads=H, head_dim=D, num_hidden_layers=1)
    wq, wk = (torch.randn(H * D, C, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.equal(gguf.unpermute_rope(gguf.permute_rope(wq, H), H), wq)
    x, pos = torch.randn(T, C, generator=g, dtype=torch.float64), torch.arange(T) * 7
    cos, sin = rope_cos_sin(pos[None], cfg, torch.float64)
    ours = [apply_rope((x @ w.T).view(T, H, D).transpose(0, 1)[None], cos, sin)[0]
            for w in (wq, wk)]
    theirs = [interleaved_rope((x @ gguf.permute_rope(w, H).T).view(T, H, D).transpose(0, 1),
                               pos, cfg.rope.theta) for w in (wq, wk)]
    assert torch.allclose(ours[0] @ ours[1].mT, theirs[0] @ theirs[1].mT, atol=1e-12)


@pytest.fixture(scope="module")
def smollm2():
    return gguf.load_gguf(dtype=torch.float32), gguf.gguf_tokenizer()


@pytest.mark.real
def test_smollm2_config_matches_the_file(smollm2):
    cfg = smollm2[0].cfg
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (
        30, 576, 9, 3, 1536, 49152)
    assert (cfg.rope.theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (1e5, 1e-5, True)
    assert smollm2[0].lm_head.weight is smollm2[0].model.embed_tokens.weight


def greedy(model, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            h = model.model(model.model.embed_tokens(x), torch.arange(x.shape[1])[None])
            x = torch.cat([x, model.lm_head(h[:, -1]).argmax(-1, keepdim=True)], 1)
    return x[0, len(ids):].tolist()


@pytest.mark.real
def test_smollm2_continues_english_sensibly(smollm2):
    """With RoPE rows in the wrong order, or a wrong eps / theta, this is gibberish."""
    model, tok = smollm2
    text = tok.decode(greedy(model, tok.encode("The capital of France is").ids, 6))
    assert "Paris" in text, text
    chat = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n")
    answer = tok.decode(greedy(model, tok.encode(chat).ids, 8))
    assert answer.startswith("The capital of France is Paris"), answer


@pytest.mark.real
def test_smollm2_logits_match_transformers(smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tok = smollm2
    c = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope.theta, tie_word_embeddings=True)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    ids = torch.tensor([tok.encode("Skip-Vision drops the FFN of redundant visual tokens.").ids])
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = model.lm_head(model.model(model.model.embed_tokens(ids),
                                        torch.arange(ids.shape[1])[None]))
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale, (got - want).abs().max()
    assert math.isfinite(scale)
