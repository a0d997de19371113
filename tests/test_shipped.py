"""The shipped tiny LLaVAs (checkpoints/): complete, small, and doing what their report says."""
from __future__ import annotations

import json
from pathlib import Path

from helpers import PLAIN, SHIPPED
from skipvision.training.data import load_conversations
from skipvision.skip import SkipConfig


def held_out_sample(tmp_path, n: int, report: dict) -> Path:
    """The first n held-out questions of the recipe's synthetic split, rebuilt in tmp_path."""
    from skipvision.training.synthetic import write_dataset
    return write_dataset(tmp_path, report["n_train"], n, seed=report["seed"],
                         splits=("test",))["test"]


def test_the_shipped_checkpoints_are_small_and_complete():
    for d in (SHIPPED, PLAIN):
        assert (d / "model.safetensors").stat().st_size <= 20 * 2**20
        for f in ("config.json", "tokenizer.json"):
            assert (d / f).is_file(), d / f
    report = json.loads((SHIPPED / "training_report.json").read_text())
    assert (SHIPPED / report["sample"]["image"]).is_file()


def test_the_shipped_models_reproduce_their_report(tmp_path):
    """Re-scored here on the first 300 held-out questions (rebuilt from the recipe's seed),
    the two shipped models get what the recipe recorded, and the sample answers are the same;
    so the README's accuracy column is what these weights do."""
    from skipvision import generate
    from skipvision.training.data import evaluate
    from skipvision.io.loading import load_pretrained
    report = json.loads((SHIPPED / "training_report.json").read_text())
    skip = SkipConfig(**json.loads((SHIPPED / "skip_config.json").read_text()))
    assert skip == SkipConfig(**report["skip"])
    plain, proc = load_pretrained(PLAIN)
    trained, proc_s = load_pretrained(SHIPPED)
    test = held_out_sample(tmp_path, 300, report)
    acc = {"plain": evaluate(plain, load_conversations(test, proc), None, 100).accuracy,
           "skip_ffn": evaluate(trained, load_conversations(test, proc_s), skip, 100).accuracy}
    for name, a in acc.items():
        assert abs(a - report[name]["accuracy_first_300"]) <= 1 / 300, (name, a)
    sample = report["sample"]
    batch = proc_s(proc_s.format(sample["question"]), [SHIPPED / sample["image"]])
    for name, s in (("plain", None), ("skip_vision", skip)):
        out = generate(trained, batch["input_ids"], batch["pixel_values"],
                       batch["attention_mask"], max_new_tokens=4, skip=s)
        assert proc_s.decode(out.tokens[0]) == sample["answers"][name], name


def test_the_shipped_plain_model_meets_the_accuracy_target():
    """Plain SFT >= 90% exact match on the held-out questions, without Skip-Vision (the
    recipe's report; the test above ties it to the committed weights)."""
    report = json.loads((SHIPPED / "training_report.json").read_text())
    assert report["plain"]["accuracy"] >= 0.90


def test_the_shipped_skip_ffn_model_is_within_3_points_of_plain():
    """Skip-FFN SFT (scored with Skip-Vision) within 3 points of plain SFT (scored without),
    both from the same stage 1 (the recipe's report; tied to the weights above)."""
    report = json.loads((SHIPPED / "training_report.json").read_text())
    plain, skip = report["plain"]["accuracy"], report["skip_ffn"]["accuracy"]
    assert skip >= plain - 0.03, (plain, skip)
