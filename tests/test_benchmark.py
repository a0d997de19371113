"""examples/benchmark.py end to end at one decoder layer: every part runs, and what it reports
agrees with skipvision.analysis.flops and with the caches it measured."""
import json

import pytest

from helpers import example_module
from skipvision import flops


@pytest.mark.slow
def test_benchmark_runs_every_part_and_reports_consistent_numbers(tmp_path, capsys):
    bench = example_module("benchmark")
    bench.main(["--layers", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
                "--threads", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "benchmark.json").read_text())
    assert {"lm_prefill", "prefill", "decode", "train", "kv_bytes", "peak_train_bytes"} <= set(res)
    model = bench.build(bench.parse_args(["--layers", "1"]))
    want = flops.compare(model.cfg, [64], [1], "sv-llava-100-156", new_tokens=3)
    assert res["flops"]["prefill"] == want["prefill"]
    kv = res["kv_bytes"]
    assert kv["plain"] == want["kv_bytes"]["plain"] and kv["evict"] == want["kv_bytes"]["evict"]
    assert all(t["ok"] for name, t in res["targets"].items() if "exactly" in name)
    assert "| LM prefill |" in capsys.readouterr().out
