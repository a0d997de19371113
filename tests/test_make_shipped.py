"""examples/make_shipped_model.py end to end at toy size: both stages, both checkpoints, the
report and the README table, with the Skip-FFN setting given on the command line."""
import json

import pytest

from helpers import example_module
from skipvision.io.loading import load_pretrained


@pytest.fixture(scope="module")
def recipe():
    return example_module("make_shipped_model")


def test_the_recipe_writes_both_checkpoints_the_report_and_the_table(tmp_path, recipe):
    readme = tmp_path / "README.md"
    begin, end = recipe.TABLE_BEGIN, recipe.TABLE_END
    readme.write_text(f"# x\n\n## Training\n\n{begin}\nold\n{end}\nafter\n")
    out, plain = tmp_path / "out", tmp_path / "plain"
    args = ["--work", str(tmp_path / "work"), "--out", str(out), "--plain-out", str(plain),
            "--readme", str(readme), "--threads", "1", "--n-train", "24", "--n-test", "12",
            "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "4",
            "--retained", "30", "--skipped", "50", "--mask", "consistent"]
    recipe.main(args)
    report = json.loads((out / "training_report.json").read_text())
    assert (report["skip"]["retained"], report["skip"]["skipped"]) == (30, 50)
    assert report["skip"]["mask"] == "consistent"
    assert json.loads((out / "skip_config.json").read_text()) == report["skip"]
    assert report["skip_ffn"]["flops"] < report["plain"]["flops"]
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{recipe.TABLE_END}\nafter\n")
    assert "Skip-FFN (30 retained / 50 skipped of 144)" in text
    model, _ = load_pretrained(out)
    assert model.summary_scorer is not None
    first = {k: v.clone() for k, v in model.state_dict().items()}

    recipe.main(args[:14] + ["--batch-size", "4", "--table-only", "--time-steps", "2",
                             "--retained", "9"])
    again = json.loads((out / "training_report.json").read_text())
    assert again["skip"] == report["skip"]  # --table-only times what is shipped, not the flags
    assert "--table-only" in again["command"]
    reloaded, _ = load_pretrained(out)
    assert all((reloaded.state_dict()[k] == v).all() for k, v in first.items())
