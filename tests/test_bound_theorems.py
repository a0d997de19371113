"""Property tests of Theorems 1-2 and Corollaries 1-2 (proofs/error_bound.md): the Skip-FFN and
Skip-KV bounds end to end and one step at a time, on generated decoder stacks (float64), their
weakened versions found violated, fast default-run checks of the bound's plumbing, and the
real-weights run on SmolLM2-135M. Shared pieces and the printed summary: bound_support.py.
"""


import pytest
import torch
from hypothesis import example, find, given, settings, target

from skipvision.analysis import bound
from skipvision.config import TextConfig
from skipvision.kv_cache import NEVER
from skipvision.llama import attention_mask, rope_cos_sin

from bound_support import (
    ATOL, DRAWN, EXAMPLES, FIND, RATIOS, RTOL, TABLES, check_bound_example, model_cases, model_input,
    positions, ratio, skips, tiny, vectors, violated)

def check_report(name, r, weaken=None):
    """All bounds of a BoundReport hold; records the worst ratios per kind of bound. With
    `weaken` = (what, column) instead: is that bound, halved, violated on some row?"""
    rows, L, v = r.rows(), r.measured.shape[0] - 1, r.valid
    kept = ~r.skip_last if hasattr(r, "skip_last") else v

    def worst(i, col, halve=1.0, tokens=v):
        m, b = rows[i][1], rows[i][col]
        b = (b if torch.is_tensor(b) and b.dim() else torch.full_like(m, float(b))) / halve
        noise = (1e3 if halve > 1 else 1.0) * ATOL * r.sizes[i][tokens]
        return ratio(m[tokens], b[tokens], noise)

    if weaken is not None:
        what, col = weaken
        found = max((worst(i, col, halve=2.0) or 0.0) for i in range(1, len(rows)))
        return violated(f"{name} {what} halved", torch.tensor(found), torch.tensor(1.0))
    assert not r.violations(RTOL, ATOL), r.violations(RTOL, ATOL)
    picks = {"end-to-end (last layer)": (2, [L], v),
             "end-to-end (logits, max)": (2, [L + 3], v),
             "one-step (all layers)": (3, range(1, L + 1), v),
             "a-priori (last layer)": (4, [L], v)}
    if hasattr(r, "skip_last"):  # propagated error only: tokens that keep the last FFN
        picks["end-to-end (last layer, FFN kept)"] = (2, [L], v & kept)
    for label, (col, idx, tokens) in picks.items():
        found = [x for x in (worst(i, col, tokens=tokens) for i in idx) if x is not None]
        DRAWN[f"{name} {label}"] += 1
        if found:
            RATIOS[f"{name} {label}"].append(max(found))
        target(max(found, default=0.0), label=f"{name} {label}")


@settings(max_examples=EXAMPLES)
@given(c=model_cases)
@example(c=dict(cfg=TextConfig(vocab_size=7, hidden_size=4, intermediate_size=6,
                               num_hidden_layers=2, num_attention_heads=2, head_dim=2),
                w=dict(scale=1.0, singular=False, gain=1.0, spread=0.2), B=1, T=1, skip_p=1.0,
                per_layer=False, n_decode=1, evict_p=1.0, scale=1.0, seed=0))  # one token
@example(c=dict(cfg=TextConfig(vocab_size=7, hidden_size=4, intermediate_size=6,
                               num_hidden_layers=2, num_attention_heads=2, head_dim=2),
                w=dict(scale=1.0, singular=False, gain=1.0, spread=0.2), B=2, T=6, skip_p=0.0,
                per_layer=False, n_decode=1, evict_p=1.0, scale=1.0, seed=0))  # nothing skipped
@pytest.mark.bound
def test_theorem1_skip_ffn(c):
    model, x, pos, horizon, skipped, _ = model_input(c, kv=False)
    r = bound.skip_ffn_bound(model, x, pos, skipped, horizon)
    r.skip_last = skipped[-1]
    check_report("Thm 1 Skip-FFN", r)


@settings(max_examples=EXAMPLES)
@given(c=model_cases)
@pytest.mark.bound
def test_theorem2_skip_kv(c):
    model, x, pos, horizon, skipped, evicted = model_input(c, kv=True)
    skipped = skipped if c["seed"] % 2 else None  # with and without Skip-FFN in both runs
    r = bound.skip_kv_bound(model, x, pos, evicted, c["n_decode"], horizon, skipped)
    check_report("Thm 2 Skip-KV", r)


@pytest.mark.bound
@pytest.mark.parametrize("theorem", ["ffn", "kv"])
@pytest.mark.parametrize("what,col", [("end-to-end", 2), ("one-step", 3), ("a-priori", 4)])
def test_theorems_weakened_are_violated(theorem, what, col):
    def fails(c):
        model, x, pos, horizon, skipped, evicted = model_input(c, kv=theorem == "kv")
        if theorem == "ffn":
            r = bound.skip_ffn_bound(model, x, pos, skipped, horizon)
        else:
            r = bound.skip_kv_bound(model, x, pos, evicted, c["n_decode"], horizon)
        return check_report(f"Thm {1 if theorem == 'ffn' else 2}", r, (what, col))
    find(model_cases, fails, settings=settings(FIND, max_examples=600))


def test_trace_is_the_model():
    """The full-run statistics come from the same computation as the model's forward."""
    model = tiny()
    g = torch.Generator().manual_seed(3)
    pos, horizon, _, _ = positions(g, 2, 7)
    x = vectors(g, (2, 7, 8), 1.0)
    skipped = skips(g, 2, 2, 7, 0.5, True)
    outs, _ = bound._run(model.model, x, pos, horizon, bound.ffn_rows(skipped))
    cos, sin = rope_cos_sin(pos, model.cfg, torch.float64)
    mask = attention_mask(pos, pos, horizon)
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            y, _ = bound.trace_layer(layer, outs[i], cos, sin, mask, mask, skipped[i])
        assert torch.allclose(y, outs[i + 1], rtol=0, atol=1e-12), i


def test_eviction_mask_is_the_cache_path():
    """skip_kv_bound's perturbed run (eviction as a horizon) equals prefill, KVCache.keep, then
    decoding with the cache, as generate() does."""
    from skipvision.kv_cache import KVCache
    model = tiny(1, layers=3)
    g = torch.Generator().manual_seed(4)
    B, T, n_dec = 2, 9, 3
    pos, horizon, horizon_new, evicted = positions(g, B, T, n_dec, 0.6)
    x = vectors(g, (B, T, 8), 1.0)
    lm, P = model.model, T - n_dec
    with torch.no_grad():
        _, want = bound._run(lm, x, pos, horizon_new, None)
        cache = KVCache(3)
        lm(x[:, :P], pos[:, :P], horizon[:, :P], cache)
        cache.keep(~evicted[:, :P] & (horizon[:, :P] != NEVER))
        got = lm(x[:, P:], pos[:, P:], horizon[:, P:], cache)
    assert torch.allclose(got, want[:, P:], rtol=0, atol=1e-12)


def test_check_bound_example_runs(tmp_path):
    out = check_bound_example().main(["--out", str(tmp_path / "bound.png")])
    assert (tmp_path / "bound.png").stat().st_size > 0 and not out["ffn"].violations()


@pytest.mark.slow
def test_check_bound_example_loads_a_checkpoint(tmp_path):
    """--model: a saved llava-hf checkpoint (tiny, word-level tokenizer) through
    load_pretrained, the processor and Skip-Vision's prepare, with Skip-KV."""
    import numpy as np
    from PIL import Image
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from skipvision import save_pretrained
    ex = check_bound_example()
    save_pretrained(ex.tiny_llava(1), tmp_path)
    words = ["<unk>", "<pad>", "<s>", "</s>", "USER", ":", "ASSISTANT", "What", "is", "in", "the",
             "image", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    Image.fromarray(np.full((30, 40, 3), 120, dtype=np.uint8)).save(tmp_path / "img.png")
    out = ex.main(["--model", str(tmp_path), "--image", str(tmp_path / "img.png"), "--retained",
                   "10", "--skipped", "20", "--decode", "2", "--out", str(tmp_path / "b.png")])
    assert not out["ffn"].violations() and not out["kv"].violations()
    assert out["ffn"].measured[-1].max() > 0 and out["kv"].measured[-1].max() > 0


def record_real(name, r):
    """Per layer: worst per-token measured/bound and max/max, as ratios over the 30 layers."""
    rows = r.table()
    TABLES.append(f"{name}\n{r.format()}")
    depth = [t for t in rows if t["layer"].isdigit() and t["measured"] > 0]
    for key in ("one_step", "end_to_end"):
        RATIOS[f"{name} {key} per token (layers)"] += [t[f"ratio_{key}"] for t in depth]
        RATIOS[f"{name} {key} max/max (layers)"] += [t["measured"] / t[key] for t in depth]
    for t in rows:
        if not t["layer"].isdigit():
            RATIOS[f"{name} end-to-end {t['layer']}"].append(t["ratio_end_to_end"])


@pytest.mark.real
def test_smollm2_bound():
    """Real SmolLM2-135M weights (30 layers), random visual tokens in the paper's layout,
    Skip-FFN in every layer, then Skip-KV for 3 decode tokens: the bounds hold; the summary
    shows how tight they are at depth 30."""
    from skipvision.io.gguf import gguf_tokenizer, load_gguf
    ex = check_bound_example()
    model = load_gguf(dtype=torch.float64)
    embeds, pos, horizon, skipped, visual = ex.smollm2_input(model, gguf_tokenizer(), 24, 40,
                                                             "random", 0)
    out = ex.run(model, embeds, pos, horizon, skipped, visual, set(range(30)), 3)
    for name in ("ffn", "kv"):
        assert not out[name].violations(RTOL, ATOL), out[name].violations(RTOL, ATOL)
        assert out[name].measured[-1].max() > 0
        record_real(f"SmolLM2 Skip-{name.upper()}", out[name])
    TABLES.append(f"SmolLM2 FFN update ratio (paper Fig. 1)\n{ex.ratio_table(out)}")

