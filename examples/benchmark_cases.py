"""The model, prompt and timed cases of examples/benchmark.py: our prefill, decode and
training step, transformers' twin on the same weights, and the KV bytes after prefill."""
from __future__ import annotations

import sys

import torch

from skipvision import KVCache, Llava, LlavaConfig, TextConfig, VisionConfig, anyres
from skipvision.generate import decode_step, prefill

import benchmark_lib as lib  # examples/, next to this file

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)  # LLaVA-1.5's tower
SIZES = {  # LM (TextConfig fields), vision (VisionConfig fields)
    # LLaVA-1.5-7B at 1/8 of its width (head dim 128 kept) and a quarter of its depth; CLIP-L
    # at 1/4 width: 336 px / 14 px patches = 576 visual tokens, as in LLaVA-1.5.
    "cpu": (dict(vocab_size=4008, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                 num_attention_heads=4, rms_norm_eps=1e-5),
            dict(CLIP_L_336, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=4)),
    "llava-1.5-7b": (dict(vocab_size=32064, rms_norm_eps=1e-5), CLIP_L_336),
    "llama3-8b": (dict(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                       rms_norm_eps=1e-5), CLIP_L_336),  # SV-LLaVA's LM
}
NEXT = dict(image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
SIZES |= {"next-cpu": SIZES["cpu"] + (NEXT,),  # LLaVA-NeXT (llava-hf/llava-v1.6-*) tiles
          "llava-next-7b": SIZES["llava-1.5-7b"] + (NEXT,)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def build(a) -> Llava:
    """A model of --size proportions in --dtype on --device, random weights."""
    text, vision, *more = SIZES[a.size]
    text = dict(text, num_hidden_layers=a.layers or text.get("num_hidden_layers", 32))
    cfg = LlavaConfig(vision=VisionConfig(**vision), text=TextConfig(**text),
                      image_token_id=text["vocab_size"] - 1, **(more[0] if more else {}))
    torch.manual_seed(0)
    with torch.device(a.device), lib.default_dtype(DTYPES[a.dtype]), torch.no_grad():
        model = Llava(cfg)  # built in its dtype: a 7B model never exists in float32
        for name, p in model.named_parameters():  # activations of order 1 throughout
            if "norm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            else:
                p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 0.02)
    return model.eval()


def prompt(cfg: LlavaConfig, text: int, batch: int, device, size=(672, 672)):
    """`batch` prompts: text/2 tokens, one image (expanded), text - text/2 tokens. Returns ids,
    mask, pixels and, for LLaVA-NeXT, {"image_sizes": ...} (images of `size`, height x width)."""
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, cfg.image_token_id, (batch, text), generator=g)
    n, S, extra = cfg.image_seq_length, cfg.vision.image_size, {}
    shape = (batch, 3, S, S)
    if cfg.image_grid_pinpoints:
        n, rows_cols = anyres.image_tokens(cfg, *size), anyres.tile_grid(cfg, *size)
        shape = (batch, 1 + rows_cols[0] * rows_cols[1], 3, S, S)
        extra = {"image_sizes": torch.tensor([size] * batch, device=device)}
    image = torch.full((batch, n), cfg.image_token_id)
    ids = torch.cat([words[:, :text // 2], image, words[:, text // 2:]], 1)
    px = torch.randn(shape, generator=g)
    return ids.to(device), torch.ones_like(ids, dtype=torch.bool), px.to(device), extra


def lm_prefill_case(model, inp):
    L = model.cfg.text.num_hidden_layers
    return (lambda: KVCache(L), lambda cache: prefill(model, inp, cache))


def decode_case(model, inp, evict: bool, steps: int):
    """Untimed: prefill (and eviction). Timed: `steps` greedy decode steps."""
    L = model.cfg.text.num_hidden_layers

    def setup():
        cache = KVCache(L)
        logits = prefill(model, inp, cache)
        if evict:
            cache.keep(~inp.layout.is_skipped)
        return cache, logits.argmax(-1), inp.pos.max(1).values + 1

    def run(state):
        cache, tok, pos = state
        for t in range(steps):
            tok = decode_step(model, tok, pos + t, cache).argmax(-1)
    return setup, run


def train_case(model, inp, opt):
    """One LM training step: forward (logits on every row), loss, backward, AdamW step.
    `inp` must be built outside inference mode (autograd saves its row indices)."""
    lm = model.language_model
    embeds = inp.embeds.detach()
    target = torch.randint(0, model.cfg.text.vocab_size, embeds.shape[:2], device=embeds.device,
                           generator=torch.Generator(embeds.device).manual_seed(0))

    def run(_):
        x = embeds.detach().requires_grad_()  # the projector/embeddings would train in SFT
        h = lm.model(x, inp.pos, inp.horizon, None, inp.ffn_rows)
        loss = torch.nn.functional.cross_entropy(lm.lm_head(h).flatten(0, 1).float(),
                                                 target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (lambda: None), run


def adamw(params):
    """AdamW in torch's fused kernel where it exists (3x faster than the default on CPU)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-6, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-6)


def hf_twin(model, a):
    """transformers' LlavaForConditionalGeneration holding our model's weights, or None."""
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: skipping the comparison with it", file=sys.stderr)
        return None
    from skipvision import to_hf
    from skipvision.io.keys import is_ignored, map_key
    d = to_hf(model.cfg)
    name = d["architectures"][0]  # LlavaForConditionalGeneration or LlavaNext...
    cfg = getattr(transformers, name.replace("ForConditionalGeneration", "Config")).from_dict(d)
    cfg._attn_implementation = "sdpa"  # transformers' fastest built-in attention on CPU and GPU
    with torch.device(a.device), lib.default_dtype(DTYPES[a.dtype]):
        hf = getattr(transformers, name)(cfg).eval()
    ours = model.state_dict()
    hf.load_state_dict({k: ours[map_key(k)] for k in hf.state_dict() if not is_ignored(k)},
                       strict=True)
    return hf


def hf_prefill(hf, ids, px, extra):
    """transformers' prefill, in its fastest form: no mask (no padding), last logits only."""
    return hf(input_ids=ids, pixel_values=px, use_cache=True, logits_to_keep=1, **extra)


def hf_decode_case(hf, ids, px, extra, steps):
    import inspect
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def setup():
        out = hf_prefill(hf, ids, px, extra)
        return getattr(out, name), out.logits[:, -1].argmax(-1)

    def run(state):
        cache, tok = state
        for _ in range(steps):
            out = hf(input_ids=tok[:, None], use_cache=True, logits_to_keep=1, **{name: cache})
            tok = out.logits[:, -1].argmax(-1)
    return setup, run


def kv_bytes(model, plain, sv, n_skipped: int) -> dict:
    """KVCache.nbytes() after prefill: plain, Skip-Vision kept, Skip-Vision evicted."""
    out = {}
    for name, inp, evict in (("plain", plain, False), ("keep", sv, False), ("evict", sv, True)):
        cache = KVCache(model.cfg.text.num_hidden_layers)
        prefill(model, inp, cache)
        if evict:
            cache.keep(~inp.layout.is_skipped)
        out[name] = cache.nbytes()
    n = sv.embeds.shape[1]  # every row has the same arranged length n and N_s skipped tokens
    out["evict_is_exactly_(n-N_s)/n_of_keep"] = out["evict"] * n == out["keep"] * (n - n_skipped)
    return out
