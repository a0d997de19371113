"""Sharded training (FSDP2, gloo on CPU) against one unsharded process, in float64 with
Skip-FFN and the summary scorer on: losses, weights, per-process bytes, resume on another
number of processes, the consolidated export (read by load_pretrained and transformers)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import PLAIN, ROOT, example_module
from test_train import model_files
from skipvision import load_pretrained
from skipvision.errors import CheckpointError
from skipvision.training.parallel import is_sharded_checkpoint, units
from skipvision.training.synthetic import write_dataset

STEPS = 3
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRAIN = str(ROOT / "examples" / "train.py")


def run(args, procs: int = 0):
    """examples/train.py in one process, or under torchrun with `procs` processes."""
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(procs)] if procs else [sys.executable])
    done = subprocess.run(head + [TRAIN, *args], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "log.jsonl").open()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Sharded on 2 processes (micro-batches of 2, so gradients accumulate; activation
    checkpointing on) and unsharded on 1, same global batches of 8, a checkpoint every step."""
    tmp = tmp_path_factory.mktemp("parallel")
    data = write_dataset(tmp / "data", 48, 12, seed=0, size=24)
    common = model_files(tmp) + [
        "--data", str(data["train"]), "--steps", str(STEPS), "--batch-size", "8",
        "--warmup", "1", "--skip", "--retained", "8", "--skipped", "12", "--dtype", "float64",
        "--threads", "1", "--train", "vision_tower,projector,language_model,summary",
        "--save-every", "1", "--keep", "0"]
    run(common + ["--shard", "--checkpointing", "--micro-batch-size", "2", "--out",
                  str(tmp / "sharded")], procs=2)
    run(common + ["--micro-batch-size", "4", "--out", str(tmp / "one")])
    return {"tmp": tmp, "common": common, "data": data, "sharded": tmp / "sharded",
            "one": tmp / "one"}


def assert_same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10, msg=k)


def test_units_partition_the_parameters():
    """Every parameter in exactly one unit or the root; the big matrices all in units."""
    from skipvision import LlavaConfig, Llava
    for tied in (False, True):
        cfg = LlavaConfig()
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
        with torch.device("meta"):
            model = Llava(cfg)
        seen = {}
        for group in units(model):
            for p in {id(p) for m in group for p in m.parameters()}:
                seen[p] = seen.get(p, 0) + 1
        assert all(n == 1 for n in seen.values())  # a tied weight is in one unit only
        rest = [n for n, p in model.named_parameters() if id(p) not in seen]
        assert all(n.startswith(("multi_modal_projector.", "language_model.model.norm.",
                                 "vision_tower.vision_model.pre_layrnorm.",
                                 "vision_tower.vision_model.post_layernorm."))
                   for n in rest), rest
        root = sum(p.numel() for p in model.parameters() if id(p) not in seen)
        assert root < 0.01 * sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_two_sharded_processes_equal_one_process(runs):
    """float64, Skip-FFN: losses and weights of every step within 1e-10."""
    assert losses(runs["sharded"]) == pytest.approx(losses(runs["one"]), rel=1e-10, abs=0)
    assert len(losses(runs["one"])) == STEPS and losses(runs["one"])[0] != losses(runs["one"])[-1]
    last = runs["sharded"] / f"step-{STEPS:07d}"
    assert is_sharded_checkpoint(last) and (last / "model.safetensors").is_file()
    assert_same_weights(last, runs["one"] / "latest")
    for step in range(1, STEPS):  # earlier sharded checkpoints: shards only, consolidated here
        ckpt = runs["sharded"] / f"step-{step:07d}"
        assert not (ckpt / "model.safetensors").exists()
        out = runs["tmp"] / f"consolidated-{step}"
        example_module("consolidate").main([str(ckpt), str(out)])
        assert_same_weights(out, runs["one"] / f"step-{step:07d}")


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_saved_by_two_processes_resumes_on_one(runs, shard):
    """From step 1 of the sharded run, one process (sharded alone, or not sharded at all)
    continues with the losses and weights of the uninterrupted run."""
    out = runs["tmp"] / f"resumed-{shard}"
    run(runs["common"] + ["--micro-batch-size", "4", "--resume",
                          str(runs["sharded"] / "step-0000001"), "--out", str(out)]
        + ["--shard"] * shard)
    assert losses(out) == pytest.approx(losses(runs["one"])[1:], rel=1e-10, abs=0)
    assert_same_weights(out / f"step-{STEPS:07d}", runs["one"] / "latest")


@pytest.mark.slow
def test_a_pretrained_model_is_read_by_process_0_alone_and_shared(runs):
    """--model under --shard: the other processes build it on meta and get their shards from
    process 0; the run equals one process reading the checkpoint itself."""
    common = ["--model", str(PLAIN), "--data", str(runs["data"]["train"]), "--steps", "2",
              "--batch-size", "4", "--warmup", "1", "--skip", "--retained", "8", "--skipped",
              "12", "--dtype", "float64", "--threads", "1"]
    run(common + ["--shard", "--out", str(runs["tmp"] / "model-sharded")], procs=2)
    run(common + ["--micro-batch-size", "2", "--out", str(runs["tmp"] / "model-one")])
    assert losses(runs["tmp"] / "model-sharded") == pytest.approx(
        losses(runs["tmp"] / "model-one"), rel=1e-10, abs=0)
    assert_same_weights(runs["tmp"] / "model-sharded" / "latest", runs["tmp"] / "model-one" /
                        "latest")


@pytest.mark.slow
def test_the_consolidated_export_loads_in_load_pretrained_and_transformers(runs):
    from transformers import LlavaForConditionalGeneration
    from helpers import llava_inputs
    from reference.hf_float64 import make_float64
    folder = runs["sharded"] / "latest"
    ours, _ = load_pretrained(folder, dtype=torch.float64)
    theirs = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float64).eval()
    make_float64(theirs, ours.cfg.text.rope, ours.cfg.text.head_dim)  # no float32 shortcuts
    ids, mask, _, px = llava_inputs(ours.cfg, 0, [40, 52])
    with torch.no_grad():
        a = ours(ids, px, mask)
        b = theirs(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    assert a.abs().max() > 0
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=0, atol=1e-9)


@pytest.mark.slow
def test_each_of_two_processes_holds_half_the_bytes(runs, tmp_path):
    """Weights, gradients and AdamW moments per process: half of one process's, within 5%."""
    worker = str(ROOT / "tests" / "parallel_worker.py")
    for n in (1, 2):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(n), worker, str(runs["data"]["train"]),
                        str(tmp_path / f"w{n}"), "shard"], env=ENV, check=True,
                       capture_output=True)
    whole = json.loads((tmp_path / "w1.0.json").read_text())
    halves = [json.loads((tmp_path / f"w2.{r}.json").read_text()) for r in (0, 1)]
    for what in ("weights", "gradients", "optimizer"):
        assert whole[what] > 0
        for h in halves:
            assert abs(h[what] / whole[what] - 0.5) <= 0.05 * 0.5, (what, h[what], whole[what])
        assert sum(h[what] for h in halves) >= whole[what]  # shards cover everything
    # the memory plan's figures are these bytes exactly (process 0 holds the padded shards)
    from skipvision.analysis.memory import plan
    from skipvision.skip import SkipConfig
    from skipvision.training.synthetic import build_tokenizer
    from test_train import tiny_config
    cfg = tiny_config(build_tokenizer().get_vocab_size())
    for n, measured in ((1, whole), (2, halves[0])):
        planned = plan(cfg, gpus=n, shard=True, skip=SkipConfig(retained=8, skipped=12),
                       weight_bytes=8, train=("vision_tower", "projector", "language_model",
                                              "summary"))
        for what in ("weights", "gradients", "optimizer"):
            assert getattr(planned, what) == measured[what], (n, what)


def test_a_sharded_checkpoint_without_weights_says_how_to_consolidate(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / ".metadata").write_bytes(b"")
    from skipvision.io.hub import weight_files
    with pytest.raises(CheckpointError, match="consolidate"):
        weight_files(tmp_path)


@pytest.mark.gpu
def test_sharded_mixed_precision_steps_on_cuda(tmp_path):
    """One process sharded on CUDA (bf16 compute, float32 master weights and reduction) tracks
    the float32 CPU run's losses within bf16's precision."""
    data = write_dataset(tmp_path / "data", 16, 4, seed=0, size=24)
    common = model_files(tmp_path) + [
        "--data", str(data["train"]), "--steps", "3", "--batch-size", "4", "--warmup", "1",
        "--skip", "--retained", "8", "--skipped", "12", "--dtype", "float32"]
    run(common + ["--shard", "--checkpointing", "--device", "cuda", "--out",
                  str(tmp_path / "cuda")])
    run(common + ["--device", "cpu", "--out", str(tmp_path / "cpu")])
    assert losses(tmp_path / "cuda") == pytest.approx(losses(tmp_path / "cpu"), rel=3e-2)
    ours, _ = load_pretrained(tmp_path / "cuda" / "latest")
    assert next(ours.parameters()).dtype == torch.float32  # the export keeps master weights
