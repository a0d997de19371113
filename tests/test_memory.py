"""The memory plan (analysis/memory.py) against the bytes autograd really keeps for backward
(reference/activations.py): each layer byte for byte over drawn shapes and dtypes, every term
needed, the whole training step within 0.5%; and the --plan CLI."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import cli_error, example_module
from reference.activations import saved_bytes
from skipvision.analysis.flops import geometry_of
from skipvision.analysis.memory import activations, decoder_layer, plan, vision_layer
from skipvision.config import TextConfig, VisionConfig
from skipvision.kv_cache import FOREVER
from skipvision.llama import DecoderLayer, attention_mask, rope_cos_sin
from skipvision.skip import SkipConfig
from skipvision.training.data import IGNORE, collate, load_conversations
from skipvision.training.fit import build_model, with_summary_scorer
from skipvision.training.synthetic import build_tokenizer, write_dataset
from skipvision.training.train import AnswerLoss, set_trainable
from skipvision.vision import CLIPEncoderLayer
from test_train import tiny_config

DTYPES = [torch.bfloat16, torch.float32, torch.float64]
PARTS = [("projector", "language_model", "summary"), ("language_model",),
         ("vision_tower", "projector", "language_model", "summary")]


def nbytes(dtype) -> int:
    return torch.finfo(dtype).bits // 8


@st.composite
def layer_cases(draw):
    H = draw(st.sampled_from([1, 2, 4]))
    return dict(dtype=draw(st.sampled_from(DTYPES)), H=H,
                Hkv=draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0])),
                D=draw(st.sampled_from([4, 8])), width=draw(st.sampled_from([1, 2])),
                F=draw(st.integers(4, 70)), B=draw(st.integers(1, 3)), T=draw(st.integers(1, 20)),
                masked=draw(st.booleans()), skip=draw(st.booleans()), seed=draw(st.integers(0, 99)))


def measure_decoder_layer(c) -> tuple[int, dict]:
    torch.manual_seed(c["seed"])
    cfg = TextConfig(vocab_size=10, hidden_size=c["H"] * c["D"] * c["width"],
                     intermediate_size=c["F"], num_hidden_layers=1, num_attention_heads=c["H"],
                     num_key_value_heads=c["Hkv"], head_dim=c["D"])
    layer = DecoderLayer(cfg).to(c["dtype"])
    B, T = c["B"], c["T"]
    x = torch.randn(B, T, cfg.hidden_size, dtype=c["dtype"], requires_grad=True)
    pos = torch.arange(T).expand(B, T)
    cos, sin = rope_cos_sin(pos, cfg, c["dtype"])
    mask = attention_mask(pos, pos, torch.full_like(pos, FOREVER)) if c["masked"] else None
    R = int(torch.randint(1, B * T + 1, ())) if c["skip"] else None
    rows = None if R is None else torch.randperm(B * T)[:R].sort().values
    shared = [cos, sin] + ([] if rows is None else [rows])  # once per model, not per layer
    n, _ = saved_bytes(lambda: layer(x, cos, sin, mask, None, 0, rows),
                       list(layer.parameters()) + shared)
    return n, decoder_layer(cfg, B, T, R, c["masked"], nbytes(c["dtype"]))


@settings(max_examples=60, deadline=None)
@given(layer_cases())
def test_a_decoder_layer_keeps_exactly_the_planned_bytes(c):
    measured, terms = measure_decoder_layer(c)
    assert measured == sum(terms.values()), terms


@settings(max_examples=40, deadline=None)
@given(layer_cases(), st.data())
def test_every_term_of_the_layer_plan_is_needed_and_exact(c, data):
    """A term dropped, or its constant doubled, no longer matches (wrong constants are caught
    by the property, not by a second copy of the formula)."""
    measured, terms = measure_decoder_layer(c)
    name = data.draw(st.sampled_from(sorted(k for k, v in terms.items() if v)))
    for wrong in (0, 2):
        assert measured != sum(terms.values()) + (wrong - 1) * terms[name], (name, wrong)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(DTYPES), st.sampled_from([1, 2, 4]), st.sampled_from([4, 8]),
       st.integers(4, 70), st.integers(1, 3), st.integers(2, 17), st.integers(0, 99))
def test_a_clip_layer_keeps_exactly_the_planned_bytes(dtype, H, D, F, I, P, seed):
    torch.manual_seed(seed)
    cfg = VisionConfig(hidden_size=H * D, intermediate_size=F, num_hidden_layers=1,
                       num_attention_heads=H, image_size=12, patch_size=4)
    layer = CLIPEncoderLayer(cfg).to(dtype)
    x = torch.randn(I, P, H * D, dtype=dtype, requires_grad=True)
    measured, _ = saved_bytes(lambda: layer(x), list(layer.parameters()))
    assert measured == vision_layer(cfg, I * P, nbytes(dtype))
    assert measured != vision_layer(cfg, I * P, nbytes(dtype)) - I * P * H * D * nbytes(dtype)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mem"), 16, 4, seed=1, size=24)["train"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("skip", [None, SkipConfig(retained=8, skipped=12),
                                  SkipConfig(retained=6, skipped=20, summary=False)])
def test_a_training_step_keeps_the_planned_activations(conversations, dtype, parts, skip):
    """AnswerLoss's forward on real batches (left-padded, images, answers) within 0.5%."""
    tok = build_tokenizer()
    model, proc = build_model(tiny_config(tok.get_vocab_size()), tok, 0, dtype)
    if skip is not None and skip.summary:
        model = with_summary_scorer(model)
    set_trainable(model, parts, skip)
    data = load_conversations(conversations, proc)
    for first, n in ((0, 4), (5, 2)):
        chunk = range(first, first + n)
        ids, mask, labels, px = collate([data.encoded[i] for i in chunk], proc.pad_token_id,
                                        [data.pixels(i) for i in chunk])
        px = px.to(dtype)
        measured, _ = saved_bytes(lambda: AnswerLoss(model, skip)(ids, mask, labels, px),
                                  list(model.parameters()))
        with torch.no_grad():
            g = geometry_of(model.prepare(ids, px, mask, skip=skip), model.cfg)
        answer = int((labels[:, 1:] != IGNORE).sum())
        planned = sum(activations(model.cfg, g, len(px), answer, skip, False, nbytes(dtype),
                                  parts).values())
        assert abs(planned / measured - 1) <= 0.005, (planned, measured)


def test_the_plan_adds_up_and_sharding_divides_the_states():
    cfg = tiny_config(64)
    one = plan(cfg, gpus=1, micro_batch=2, text=20, shard=True, weight_bytes=4)
    two = plan(cfg, gpus=2, micro_batch=2, text=20, shard=True, weight_bytes=4)
    n = sum(p.numel() for p in build_model(cfg, build_tokenizer(), 0)[0].parameters())
    assert one.weights == 4 * n and one.activations == two.activations
    for part in ("weights", "gradients", "optimizer"):
        assert 0.5 <= getattr(two, part) / getattr(one, part) <= 0.55
    assert one.total == one.weights + one.gradients + one.optimizer + one.gathered + \
        one.activations
    ckpt = plan(cfg, gpus=1, micro_batch=2, text=20, checkpointing=True)
    assert ckpt.activations < plan(cfg, gpus=1, micro_batch=2, text=20).activations


def test_plan_cli_prints_the_table_and_refuses_nonsense(tmp_path, capsys):
    from test_train import model_files
    files = model_files(tmp_path)
    train = example_module("train")
    train.main(["--plan", *files[:2], "--gpus", "2", "--shard", "--batch-size", "8",
                "--text-tokens", "40", "--skip", "--retained", "8", "--skipped", "12"])
    out = capsys.readouterr().out
    assert "| activations |" in out and "Skip-FFN 8/12 + ckpt" in out and "fits in" in out
    assert "--gpus" in cli_error(train.main, ["--plan", *files[:2], "--gpus", "0"], capsys)
