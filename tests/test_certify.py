"""Certified answers (proofs/error_bound.md, Corollary 3): on the shipped plain model with
training-free Skip-Vision (float64), no certified step flips and every certified answer is the
one `generate` gives; with the bound set to zero, certified steps do flip (the check can fail)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import PLAIN, SHIPPED
from skipvision import load_pretrained
from skipvision.analysis.certify import certify, reference_answer
from skipvision.errors import InputError
from skipvision.generate import generate
from skipvision.io.loading import load_skip_config
from skipvision.training.data import collate, encode, load_conversations
from skipvision.training.synthetic import write_dataset

SETTINGS = [dict(), dict(kv="keep"), dict(layers=(3,)), dict(layers=(3,), kv="keep"),
            dict(layers=(2, 3), mask="consistent"), dict(layers=(0,), kv="keep")]


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    model, proc = load_pretrained(PLAIN, dtype=torch.float64)
    path = write_dataset(tmp_path_factory.mktemp("cert"), 20000, 40, seed=0, splits=("test",))
    data = load_conversations(path["test"], proc)
    out = []
    for i in range(len(data.records)):
        ids, mask, _, px = collate([encode(data.records[i], proc, answers=False)],
                                   proc.pad_token_id, [data.pixels(i)])
        out.append((ids, mask, px.double()))
    return model, out


def certificates(model, questions, skip):
    for ids, mask, px in questions:
        inp = model.prepare(ids, px, mask, skip=skip)
        answer = reference_answer(model, inp, 8)
        got = generate(model, ids, px, mask, max_new_tokens=8, skip=skip)
        yield certify(model, inp, skip, answer), got.tokens[0, :int(got.lengths[0])]


@pytest.mark.bound
def test_no_certified_step_flips_and_certified_answers_are_generates(questions):
    model, qs = questions
    base = load_skip_config(SHIPPED)
    certified = flips = 0
    for setting in SETTINGS:
        skip = dataclasses.replace(base, **setting)
        for c, got in certificates(model, qs, skip):
            assert not bool((c.steps & c.flipped).any()), setting
            assert bool((c.bounds >= 0).all()) and bool(torch.isfinite(c.bounds).all())
            if c.certified:
                assert torch.equal(got, c.tokens), setting
            certified += c.certified
            flips += int(c.flipped.sum())
    assert certified > 0 and flips > 0  # both sides occur: the check has something to catch


@pytest.mark.bound
def test_a_certificate_without_the_bound_is_caught(questions):
    """margin > 0 instead of margin > 2B: flipped steps get 'certified'."""
    model, qs = questions
    skip = load_skip_config(SHIPPED)
    assert any(bool(((c.margins > 0) & c.flipped).any())
               for c, _ in certificates(model, qs, skip))


def test_certify_takes_one_arranged_prompt(questions):
    model, qs = questions
    ids, mask, px = qs[0]
    with pytest.raises(InputError, match="one Skip-Vision-arranged prompt"):
        certify(model, model.prepare(ids, px, mask), load_skip_config(SHIPPED), ids[0, :2])


def test_the_bound_refuses_anything_but_float64():
    """Rounding in float32 (~1e-7) would read as violations: refused, with the fix named."""
    from skipvision.analysis import bound
    from skipvision.llama import LlamaForCausalLM
    from skipvision.config import TextConfig
    model = LlamaForCausalLM(TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                        num_hidden_layers=1, num_attention_heads=2))
    x, pos = torch.randn(1, 4, 8), torch.arange(4)[None]
    with pytest.raises(InputError, match="float64.*double"):
        bound.skip_ffn_bound(model, x, pos, torch.zeros(1, 4, dtype=torch.bool))
    r = bound.skip_ffn_bound(model.double(), x.double(), pos, torch.ones(1, 4, dtype=torch.bool))
    assert r.measured[-1].max() > 0 and not r.violations()
