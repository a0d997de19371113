"""Fine-tuning: loss, schedule, data order, accumulation, DDP, exact resume, bad data, CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import ROOT, example_module
from skipvision import LlavaConfig, TextConfig, VisionConfig, to_hf
from skipvision.errors import NonFiniteError
from skipvision.training.checkpoint import checkpoints, resolve, save_checkpoint
from skipvision.training.data import IGNORE, DataError, collate, load_conversations
from skipvision.training.fit import build_model, fit, with_summary_scorer
from skipvision.skip import SkipConfig
from skipvision.training.synthetic import build_tokenizer, write_dataset
from skipvision.training.train import AnswerLoss, TrainConfig, Trainer, batch_indices

SIZE = 24  # 6x6 = 36 image tokens: small enough for fast tests


def tiny_config(vocab: int) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, image_size=SIZE, patch_size=4),
        text=TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        rms_norm_eps=1e-5, max_position_embeddings=160, bos_token_id=1,
                        eos_token_id=2, pad_token_id=3),
        image_token_id=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: thread start-up costs more than it gains, and cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("syn"), 48, 12, seed=0, size=SIZE)


def setup(dataset, dtype=torch.float64, skip=None, seed=0):
    tok = build_tokenizer()
    model, proc = build_model(tiny_config(tok.get_vocab_size()), tok, seed, dtype)
    if skip is not None and skip.summary:
        model = with_summary_scorer(model)
    return model, proc, load_conversations(dataset["train"], proc)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    c = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [c.lr_at(s) for s in range(110)]
    assert lrs[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and c.lr_at(110) == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_data_order_is_a_stream_of_epoch_permutations():
    n, b = 10, 4
    stream = sum((batch_indices(n, b, seed=7, step=s) for s in range(5)), [])  # 20 = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    assert batch_indices(n, b, 7, 3) == stream[12:16]
    assert batch_indices(n, b, 8, 0) != stream[:4]


def test_only_the_chosen_parts_that_the_forward_uses_train(dataset):
    model, proc, data = setup(dataset, skip=SkipConfig(retained=8, skipped=12))
    tr = Trainer(model, data, TrainConfig(steps=1, batch_size=4, train=("projector", "summary")),
                 SkipConfig(retained=8, skipped=12), proc.pad_token_id)
    names = {n for n, _ in tr.trained}
    assert names and all(n.startswith(("multi_modal_projector.", "summary_scorer.")) for n in names)
    assert any(n.startswith("summary_scorer.") for n in names)
    model, proc, data = setup(dataset)
    tr = Trainer(model, data, TrainConfig(steps=1, batch_size=4, train=(
        "vision_tower", "projector", "language_model")), None, proc.pad_token_id)
    names = {n for n, _ in tr.trained}
    # vision_feature_layer -2 of 3: layer 2 and post_layernorm never run, so never train
    assert "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight" in names
    assert not any(".layers.2." in n or "post_layernorm" in n for n in names)
    with pytest.raises(ValueError, match="unknown trainable part"):
        TrainConfig(train=("vision",))


def test_loss_is_the_summed_cross_entropy_of_answer_tokens(dataset):
    model, proc, data = setup(dataset)
    ids, mask, labels, px = collate(data.encoded[:3], proc.pad_token_id,
                                    [data.pixels(i) for i in range(3)])
    got = AnswerLoss(model)(ids, mask, labels, px.double())
    logits = model(ids, px.double(), mask)  # (B, T, V)
    want, n = 0.0, 0
    for b in range(3):
        for t in range(1, ids.shape[1]):
            if labels[b, t] != IGNORE:
                want += F.cross_entropy(logits[b, t - 1], labels[b, t]).item()
                n += 1
    assert n == int((labels != IGNORE).sum()) > 3
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_a_skip_config_that_skips_nothing_gives_the_plain_loss_exactly(dataset):
    model, proc, data = setup(dataset)
    b = collate(data.encoded[:3], proc.pad_token_id, [data.pixels(i) for i in range(3)])
    b = b[:3] + (b[3].double(),)
    noop = SkipConfig(retained=model.cfg.image_seq_length, skipped=0, summary=False)
    assert torch.equal(AnswerLoss(model, noop)(*b), AnswerLoss(model)(*b))


def run_steps(dataset, steps, skip=None, **cfg):
    model, proc, data = setup(dataset, skip=skip)
    tr = Trainer(model, data, TrainConfig(steps=steps, warmup_steps=1, **cfg), skip,
                 proc.pad_token_id)
    losses = [tr.step().loss for _ in range(steps)]
    return model, losses


def test_gradient_accumulation_equals_one_big_batch(dataset):
    big, l1 = run_steps(dataset, 3, batch_size=8)
    acc, l2 = run_steps(dataset, 3, batch_size=8, micro_batch_size=2)
    assert l1 == pytest.approx(l2, rel=1e-12)
    for (k, a), b in zip(big.state_dict().items(), acc.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=k)


def test_skip_ffn_sft_trains_the_summary_scorer_and_learns(dataset):
    skip = SkipConfig(retained=8, skipped=12)
    model, proc, data = setup(dataset, skip=skip)
    before = weights(model)
    tr = Trainer(model, data, TrainConfig(steps=12, batch_size=8, warmup_steps=1, lr=3e-3),
                 skip, proc.pad_token_id)
    losses = [tr.step().loss for _ in range(12)]
    after = weights(model)
    assert losses[-1] < 0.7 * losses[0]
    for k in after:
        moved = not torch.equal(before[k], after[k])
        assert moved == (not k.startswith("vision_tower.")), k  # frozen tower (default parts)
    assert after["summary_scorer.score.weight"].abs().sum() > 0


def cli():
    return example_module("train")


def model_files(tmp_path):
    tok = build_tokenizer()
    (tmp_path / "config.json").write_text(json.dumps(to_hf(tiny_config(tok.get_vocab_size()))))
    tok.save(str(tmp_path / "tokenizer.json"))
    return ["--config", str(tmp_path / "config.json"), "--tokenizer",
            str(tmp_path / "tokenizer.json")]


def test_resume_reproduces_an_uninterrupted_run_exactly(dataset, tmp_path):
    common = model_files(tmp_path) + [
        "--data", str(dataset["train"]), "--steps", "6", "--batch-size", "4", "--warmup", "2",
        "--skip", "--retained", "8", "--skipped", "12", "--save-every", "2", "--keep", "0",
        "--train", "vision_tower,projector,language_model,summary"]
    main = cli().main
    main(common + ["--out", str(tmp_path / "a")])
    main(common + ["--out", str(tmp_path / "b"), "--stop-after", "3"])
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-0000002", "step-0000003"]
    main(common + ["--resume", str(tmp_path / "b")])
    a, b = (load_file(tmp_path / d / "step-0000006" / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and any(k.startswith("summary_scorer.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").open()]
    assert log("a") == log("b")  # b logged steps 1-3, then 4-6 after the resume
    with pytest.raises(ValueError, match="batch_size"):
        main(common[:-4] + ["--batch-size", "8", "--resume", str(tmp_path / "b")])


def test_a_bad_image_mid_run_stops_and_keeps_every_trained_step(dataset, tmp_path):
    model, proc, data = setup(dataset)
    tr = Trainer(model, data, TrainConfig(steps=6, batch_size=4, warmup_steps=1), None,
                 proc.pad_token_id)
    bad = batch_indices(len(data), 4, 0, step=3)[0]  # first image of the 4th batch
    original = data.records[bad].image
    data.records[bad].image = tmp_path / "gone.png"
    with pytest.raises(DataError, match=f"train.jsonl:{data.records[bad].line}: "):
        fit(tr, tmp_path / "out", proc, save_every=2)
    assert [p.name for p in checkpoints(tmp_path / "out")] == ["step-0000002", "step-0000003"]
    assert resolve(tmp_path / "out").name == "step-0000003"
    saved = load_file(tmp_path / "out" / "step-0000003" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    data.records[bad].image = original


def test_a_failed_save_leaves_the_previous_checkpoint_whole(dataset, tmp_path, monkeypatch):
    model, proc, data = setup(dataset)
    first = save_checkpoint(tmp_path, 1, model, proc, {"step": 1})
    files = {p.name: p.read_bytes() for p in first.iterdir()}
    import skipvision.io.saving

    def broken(state, path, **k):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(skipvision.io.saving, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, proc, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == files
    assert resolve(tmp_path) == first.resolve()


def test_cli_smoke_skip_vision_sft_with_evaluation(dataset, tmp_path, capsys):
    cli().main(model_files(tmp_path) + [
        "--data", str(dataset["train"]), "--eval-data", str(dataset["test"]), "--steps", "3",
        "--batch-size", "4", "--skip", "--retained", "8", "--skipped", "12",
        "--out", str(tmp_path / "run"), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert "eval at step 3: exact match" in err and "step 3/3" in err
    from skipvision.io.loading import load_pretrained
    model, _ = load_pretrained(tmp_path / "run" / "latest")
    assert model.summary_scorer is not None and model.cfg.summary_scorer
    info = json.loads((tmp_path / "run" / "latest" / "training.json").read_text())
    assert info["step"] == 3 and info["eval"]["n"] == 12


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(dataset, tmp_path):
    """Same global batch of 8: 2 processes x 4 under DDP (gloo) vs 1 process x (2 x 4)."""
    common = model_files(tmp_path) + [
        "--data", str(dataset["train"]), "--steps", "3", "--batch-size", "8", "--warmup", "1",
        "--skip", "--retained", "8", "--skipped", "12", "--dtype", "float64", "--threads", "1",
        "--train", "vision_tower,projector,language_model,summary"]
    script = str(ROOT / "examples" / "train.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", script, *common, "--out", str(tmp_path / "ddp")],
                   check=True, env=env, capture_output=True, text=True)
    subprocess.run([sys.executable, script, *common, "--micro-batch-size", "4", "--out",
                    str(tmp_path / "one")], check=True, env=env, capture_output=True)
    log = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").open()]
    assert log("ddp") == pytest.approx(log("one"), rel=1e-10, abs=0)
    a, b = (load_file(tmp_path / d / "latest" / "model.safetensors") for d in ("ddp", "one"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10, msg=k)
    assert len(log("one")) == 3 and log("one")[0] != log("one")[-1]


@pytest.mark.gpu
def test_bf16_autocast_step_on_cuda(dataset):
    model, proc, data = setup(dataset, dtype=torch.float32)
    model = model.cuda()
    from skipvision.training.train import Dist
    tr = Trainer(model, data, TrainConfig(steps=2, batch_size=4, warmup_steps=1), None,
                 proc.pad_token_id, Dist(device=torch.device("cuda")))
    losses = [tr.step().loss for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    assert next(model.parameters()).dtype == torch.float32


def test_a_nan_loss_stops_before_the_optimizer_step(dataset, tmp_path):
    model, proc, data = setup(dataset)
    with torch.no_grad():
        model.language_model.lm_head.weight[3, 0] = math.nan  # every logit row reads it
    before = weights(model)
    tr = Trainer(model, data, TrainConfig(steps=3, batch_size=4), pad_id=proc.pad_token_id)
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan"):
        fit(tr, tmp_path / "run", proc)
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) or k.endswith("lm_head.weight") for k in after)
    assert tr.step_count == 0 and not checkpoints(tmp_path / "run")  # nothing trained, saved
