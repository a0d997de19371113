"""examples/compare_methods.py and generate.py --prune on the shipped models."""
import json

import pytest

from helpers import SHIPPED, cli_error, example_module
from skipvision import generate, load_pretrained
from skipvision.pruning import Prune


def test_generate_prune_answers_as_the_api_and_counts_its_flops(capsys):
    example_module().main(["--prune", "divprune", "--budget", "12", "--report", "json",
                           "--device", "cpu", "--max-new-tokens", "4"])
    plain, pruned = json.loads(capsys.readouterr().out)
    assert plain["skip"] is None and Prune(**pruned["skip"]) == Prune("divprune", 12)
    model, proc = load_pretrained(SHIPPED)
    inputs = proc(proc.format(pruned["question"]), [pruned["image"]])
    want = generate(model, inputs["input_ids"], inputs["pixel_values"],
                    inputs["attention_mask"], max_new_tokens=4, skip=Prune("divprune", 12))
    assert pruned["answer"] == proc.decode(want.tokens[0, :int(want.lengths[0])])
    assert pruned["prefill_tokens"] == plain["prefill_tokens"] - (144 - 12)
    assert 0 < pruned["flops"]["prefill_counted"] < plain["flops"]["prefill"]["plain"]


@pytest.mark.parametrize("argv, message", [
    (["--prune", "fastv"], "--prune and --budget go together"),
    (["--budget", "8"], "--prune and --budget go together"),
    (["--prune", "random", "--budget", "8", "--skip", "checkpoint"], "--prune replaces"),
    (["--prune", "random", "--budget", "0"], "Prune.budget"),
    (["--prune", "random", "--budget", "500"], "budget 500 exceeds the 144 tokens"),
    (["--prune", "fastv", "--budget", "8", "--prune-layer", "9"], "the decoder has 4 layers"),
    (["--prune", "nope", "--budget", "8"], "invalid choice")])
def test_generate_prune_mistakes_are_one_line(argv, message, capsys):
    err = cli_error(example_module().main, argv + ["--device", "cpu"], capsys)
    assert message in err


def test_compare_methods_writes_every_method_and_consistent_ratios(tmp_path, capsys):
    mod = example_module("compare_methods")
    res = mod.main(["--questions", "16", "--repeats", "1", "--warmup", "0", "--budgets", "8",
                    "24", "--decode-steps", "2", "--no-large", "--out", str(tmp_path)])
    rows = res["rows"]
    assert [r["method"] for r in rows[:1]] == ["plain"] and len(rows) == 1 + 9 * 2
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    plain = rows[0]["shipped"]
    assert plain["lm_prefill_flops_ratio"] == plain["prefill"]["ratio"] == 1.0
    for r in rows[1:]:
        s = r["shipped"]
        assert 0 < s["lm_prefill_flops_ratio"] < 1 and 0 < s["kv_ratio"] < 1, r
        assert 0 <= r["accuracy"] <= 1 and set(r["by_type"]) == set(rows[0]["by_type"])
    small, big = ({r["method"]: r["shipped"]["lm_prefill_flops"] for r in rows[1:]
                   if r["budget"] == b} for b in (8, 24))
    assert all(small[m] < big[m] for m in small)  # fewer tokens, fewer FLOPs, every method
    table = (tmp_path / "compare.md").read_text()
    assert table.count("\n| ") == len(rows) and "skip-vision fine-tuned" in table
