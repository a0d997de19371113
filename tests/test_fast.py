"""skipvision/fast: the static KV cache, fused projections and the compiled decode step give
the tokens (and, in float64, the logits) of the plain paths."""
import json

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from helpers import assert_close, llava_inputs, tiny
from skipvision import SkipConfig, fast
from skipvision.errors import InputError
from skipvision.generate import decode_step, generate, prefill
from skipvision.io.loading import load_pretrained
from skipvision.io.saving import save_pretrained
from skipvision.kv_cache import KVCache
from skipvision.pruning import Prune
from strategies import lengths, models, skips


def fused_copy(model):
    twin = type(model)(model.cfg).to(next(model.parameters()).dtype).eval()
    twin.load_state_dict(model.state_dict())
    return fast.fuse(twin)


@settings()
@given(m=models(), data=st.data(), lens=lengths, n_img=st.integers(0, 2))
def test_static_cache_and_fused_projections_generate_the_same_tokens(m, data, lens, n_img):
    """Greedy, plain and drawn Skip-Vision settings (evict and keep), left-padded batches."""
    model, seed = m
    assume(n_img or min(lens) > 0)
    skip = data.draw(st.none() | skips(model.cfg)) if n_img else None
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens, n_img)
    want = generate(model, ids, px, mask, max_new_tokens=5, eos_ids=(), skip=skip)
    static = fast.generate(model, ids, px, mask, max_new_tokens=5, eos_ids=(), skip=skip)
    twin = fused_copy(model)
    fused = generate(twin, ids, px, mask, max_new_tokens=5, eos_ids=(), skip=skip)
    both = fast.generate(twin, ids, px, mask, max_new_tokens=5, eos_ids=(), skip=skip)
    for got in (static, fused, both):
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert static.kv_bytes == want.kv_bytes  # the slots in use, as the dynamic cache holds


@settings()
@given(m=models(), data=st.data(), lens=lengths)
def test_static_decode_logits_equal_the_dynamic_cache(m, data, lens):
    model, seed = m
    skip = data.draw(st.none() | skips(model.cfg))
    ids, mask, _, px = llava_inputs(model.cfg, seed, lens)
    L = model.cfg.text.num_hidden_layers
    caches = KVCache(L), fast.StaticKVCache(L, 4)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
        outs = [prefill(model, inp, c) for c in caches]
        assert_close(outs[1], outs[0], 1e-12, "prefill")
        if skip is not None and skip.kv == "evict":
            for c in caches:
                c.keep(~inp.layout.is_skipped)
        pos, tok = inp.pos.max(1).values + 1, outs[0].argmax(-1)
        for t in range(4):
            a, b = (decode_step(model, tok, pos + t, c) for c in caches)
            assert_close(b, a, 1e-12, f"decode step {t}")
            tok = a.argmax(-1)
    assert caches[1].nbytes() == caches[0].nbytes()


def test_eviction_frees_static_slots_for_the_next_tokens_and_says_what_stays_allocated():
    model, seed = tiny(layers=2, image_size=6), 0
    n = model.cfg.image_seq_length
    skip = SkipConfig(retained=1, skipped=n - 1, summary=False, kv="evict")
    ids, mask, _, px = llava_inputs(model.cfg, seed, [3])
    cache = fast.StaticKVCache(model.cfg.text.num_hidden_layers, 2)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
        prefill(model, inp, cache)
        full, T = cache.allocated_bytes(), inp.embeds.shape[1]
        cache.keep(~inp.layout.is_skipped)
        kept = int((~inp.layout.is_skipped).sum())
        assert int(cache.used) == kept and cache.allocated_bytes() == full
        assert cache.nbytes() == full * kept // (T + 2)
        decode_step(model, ids[:, -1], inp.pos.max(1).values + 1, cache)
        assert int(cache.used) == kept + 1  # written into a freed slot
        assert int((cache.horizon[0] >= 0).sum()) == kept + 1


def test_fused_checkpoints_keep_the_original_names(tmp_path):
    model = tiny(layers=2, image_size=4)
    twin = fused_copy(model)
    mine, theirs = twin.state_dict(), model.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not any("qkv" in n or "gate_up" in n for n, _ in model.named_parameters())
    assert any("qkv_proj" in n for n, _ in twin.named_parameters())
    save_pretrained(twin, tmp_path / "ckpt")
    back = load_pretrained(tmp_path / "ckpt", dtype=torch.float64)[0].state_dict()
    assert sorted(back) == sorted(theirs) and all(torch.equal(back[k], theirs[k]) for k in back)


def test_static_cache_refuses_what_it_cannot_hold():
    model, seed = tiny(layers=2, image_size=4), 0
    ids, mask, _, px = llava_inputs(model.cfg, seed, [2])
    with pytest.raises(InputError, match="static=True"):
        fast.generate(model, ids, px, mask, static=False, compile=True)
    with pytest.raises(InputError, match="dynamic cache"):
        fast.generate(model, ids, px, mask, skip=Prune("fastv", 1, layer=1))
    cache = fast.StaticKVCache(model.cfg.text.num_hidden_layers, 0)
    with torch.no_grad():
        inp = model.prepare(ids, px, mask)
        prefill(model, inp, cache)
        with pytest.raises(InputError, match="slots"):
            decode_step(model, ids[:, -1], inp.pos.max(1).values + 1, cache)


@pytest.mark.slow
def test_the_compiled_decode_step_generates_the_same_tokens():
    """torch.compile of decode_step over the static cache (one compile for every step)."""
    model, seed = tiny(layers=2, image_size=6).float(), 0
    step = fast.compiled_step()
    for skip in (None, SkipConfig(retained=3, skipped=4, kv="evict"),
                 SkipConfig(retained=2, skipped=3, kv="keep", mask="consistent", layers=[1]),
                 SkipConfig(retained=4, skipped=2, summary=False, merge_order="spatial")):
        ids, mask, _, px = llava_inputs(model.cfg, seed, [3, 1], dtype=torch.float32)
        want = generate(model, ids, px, mask, max_new_tokens=6, eos_ids=(), skip=skip)
        got = fast.generate(model, ids, px, mask, max_new_tokens=6, eos_ids=(), skip=skip,
                            compile=True, step=step)
        assert step.failed is None, step.failed
        assert torch.equal(got.tokens, want.tokens)


def test_generate_cli_fast_paths_answer_the_same_and_report_the_roofline(capsys):
    from helpers import example_module
    argv = ["--report", "json", "--device", "cpu", "--max-new-tokens", "4"]
    example_module().main(argv)
    want = json.loads(capsys.readouterr().out)
    example_module().main(argv + ["--fuse", "--static-cache"])
    got = json.loads(capsys.readouterr().out)
    for w, g in zip(want, got, strict=True):
        assert g["answer"] == w["answer"] and g["kv_bytes"] == w["kv_bytes"]
        assert g["memory_bandwidth_gb_s"] > 0 and g["matmul_gflop_s"] > 0
        assert 0 < g["prefill_fraction_of_matmul"] < 2


@pytest.mark.slow
def test_bench_decode_reports_every_path_against_the_floor(tmp_path):
    from helpers import example_module
    res = example_module("bench_decode").main(
        ["--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-compile", "--no-smollm2",
         "--out", str(tmp_path)])
    dec = res["benchmark"]["decode"]
    assert set(dec) == {"ours", "ours static", "ours static fused", "transformers"}
    assert dec["transformers"]["ratio"] == 1.0
    assert 0 < res["benchmark"]["gemv_floor_s"] < dec["ours"]["median_s"]
    assert all(0 < d["bandwidth_fraction"] < 1.5 for d in dec.values())
    assert "matrix-vector products alone" in (tmp_path / "decode.md").read_text()
