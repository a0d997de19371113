"""Fuzz the scripts users run with drawn argument lists: examples/generate.py on a tiny saved
checkpoint and examples/train.py on a tiny data file. Whatever the flags, a script finishes
(exit 0, its report on stdout) or stops for the user's mistake with exit status 2 and one
line on stderr; never a traceback, a hang or a blow-up (each run is in the sandbox)."""
import contextlib
import io
import json
import os

import pytest
from hypothesis import given, strategies as st

from fuzz_support import COUNTS, OUTCOMES, fuzz, write_checkpoint
from helpers import example_module

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = write_checkpoint(root / "ckpt")
    (ckpt / "example.json").write_text(json.dumps({"image": "sample.png", "prompt": "a?"}))
    good = {"id": "1", "image": str(ckpt / "sample.png"), "conversations": [
        {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a cat"}]}
    (root / "good.jsonl").write_text("\n".join(json.dumps(good) for _ in range(4)))
    (root / "bad.jsonl").write_text('{"conversations": [}\n' + json.dumps(good))
    (root / "latin1.jsonl").write_bytes(json.dumps(good).encode() + b"\n\xe9t\xe9\n")
    (root / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def cli_case(script: str, argv: list[str]):
    """The script as its __main__ runs it (cli.run_main): exit code, stdout, stderr."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    module, cli = example_module(script), example_module("cli")
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run_main(module.main, argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return ("exited", code, out.getvalue(), err.getvalue())


def check(suite: str, outcome, report_json: bool):
    COUNTS[suite] += 1
    assert outcome.kind == "ok", f"{suite}: {outcome}"
    _, code, out, err = outcome.value
    OUTCOMES[suite, f"exit {code}"] += 1
    assert code in (0, 2), f"{suite}: exit {code}\n{err[-2000:]}"
    if code == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, f"{suite}: {err!r}"
    elif report_json:
        reports = json.loads(out)
        assert all("answer" in r for r in (reports if isinstance(reports, list) else [reports]))


def flags(pools: dict):
    """Argument lists: a drawn subset of the flags, each with a drawn value (or none)."""
    def build(chosen):
        argv = []
        for flag, value in chosen:
            argv += [flag] if value is None else [flag, value]
        return argv
    items = [st.tuples(st.just(f), st.sampled_from(v)) for f, v in pools.items()]
    return st.lists(st.one_of(items), max_size=4, unique_by=lambda fv: fv[0]).map(build)


def generate_pools(root):
    c = str(root / "ckpt")
    return {
        "--model": [c, c, c, str(root / "missing"), str(root / "notes.txt"), "org/name", "",
                    str(root / "empty")],
        "--image": [str(root / "ckpt" / "sample.png"), str(root / "missing.png"),
                    str(root / "notes.txt"), str(root)],
        "--prompt": ["hi", "hi", "", "<image> <image> two", "word " * 80],
        "--template": ["llava", "vicuna_v1", "raw", "bogus"],
        "--max-new-tokens": ["1", "3", "3", "0", "-1", "x", "1000000000"],
        "--temperature": ["0", "0.7", "0.7", "-1", "nan", "inf", "x"],
        "--top-p": ["0.9", "0.9", "0", "2", "nan"], "--seed": ["0", "-1", "x"],
        "--dtype": ["auto", "float32", "float64", "bfloat16", "float8", "x"],
        "--device": ["cpu", "cpu", "cuda", "gpu", ""],
        "--skip": ["none", "both", "both", "sv-llava-100-156", "bogus"],
        "--retained": ["1", "2", "0", "-1", "1000", "x"], "--skipped": ["1", "2", "-5", "x"],
        "--mask": ["causal", "consistent", "x"], "--kv": ["evict", "keep", "x"],
        "--revision": ["main"], "--bogus": [None, "1"]}


@fuzz(200)
@given(data=st.data())
def test_generate_script_with_drawn_flags(box, files, data):
    argv = data.draw(flags(generate_pools(files)), label="argv")
    argv = (["--model", str(files / "ckpt")] if "--model" not in argv else []) + argv
    check("generate.py flags", box(cli_case, "generate", argv + ["--report", "json",
                                                                  "--offline"]), True)


def train_pools(root):
    return {
        "--data": [str(root / "good.jsonl")] * 3 + [str(root / "bad.jsonl"),
                                                    str(root / "latin1.jsonl"),
                                                    str(root / "missing.jsonl")],
        "--eval-data": [str(root / "good.jsonl"), str(root / "missing.jsonl")],
        "--steps": ["1", "0", "-1", "x"], "--batch-size": ["1", "2", "0", "3"],
        "--micro-batch-size": ["0", "1", "-1"], "--lr": ["1e-3", "-1", "nan", "inf"],
        "--warmup": ["0", "-1"], "--grad-clip": ["1", "nan"],
        "--train": ["projector", "bogus", "summary,projector"], "--skip": [None],
        "--retained": ["1", "0", "-1", "9"], "--skipped": ["1", "9"],
        "--skip-layers": ["0", "x", "5"], "--resume": [str(root / "missing"),
                                                      str(root / "empty")],
        "--device": ["cpu", "cuda"], "--dtype": ["float32", "x"], "--keep": ["-1", "1"],
        "--threads": ["1", "0"], "--bogus": [None]}


@fuzz(100)
@given(data=st.data())
def test_train_script_with_drawn_flags(box, files, data, tmp_path):
    argv = data.draw(flags(train_pools(files)), label="argv")
    argv = (["--data", str(files / "good.jsonl")] if "--data" not in argv else []) + argv
    base = ["--model", str(files / "ckpt"), "--out", str(tmp_path / "run"), "--steps", "1",
            "--batch-size", "2", "--eval-every", "1"]
    check("train.py flags", box(cli_case, "train", base + argv), False)


def parse_case(script: str, argv: list[str]):
    """Only the script's flag checks (its run is minutes long): exit code and stderr."""
    module, err, code = example_module(script), io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            module.parse_args(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return ("exited", code, "", err.getvalue())


OTHER_POOLS = {
    "benchmark": {"--size": ["cpu", "x"], "--layers": ["1", "0", "-2", "x"],
                  "--dtype": ["float32", "x"], "--threads": ["1", "0"],
                  "--preset": ["sv-llava-100-156", "64/156", "64/", "x/y", ""],
                  "--sweep": ["64/156,100/156", "bogus"], "--text": ["0", "-1"],
                  "--batch": ["1", "0"], "--new-tokens": ["1", "0"], "--repeats": ["1", "0"],
                  "--skip-parts": ["train,hf", "tarin", ""], "--bogus": [None]},
    "check_bound": {"--smollm2": [None], "--model": ["x"], "--visual": ["random", "x"],
                    "--retained": ["1", "-1", "x"], "--skipped": ["2", "-3"],
                    "--decode": ["0", "2", "-1"], "--seed": ["0", "-1"], "--bogus": [None]}}


@fuzz(100)
@given(script=st.sampled_from(sorted(OTHER_POOLS)), data=st.data())
def test_benchmark_and_check_bound_flags(box, script, data):
    argv = data.draw(flags(OTHER_POOLS[script]), label="argv")
    check("benchmark.py / check_bound.py flags", box(parse_case, script, argv), False)
