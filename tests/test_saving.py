"""save_pretrained replaces a checkpoint as a whole: killed after any file it writes or any
rename, the folder holds the old checkpoint or the new one, never a mix, and the next save
leaves nothing behind."""
import os
import shutil

import pytest
import torch

import skipvision.io.saving as saving
from fuzz_support import tiny_model
from helpers import randomize_
from skipvision import SkipConfig, load_pretrained
from skipvision.errors import CheckpointError
from skipvision.io.loading import load_skip_config
from skipvision.io.saving import save_pretrained

OPS = [("saving", "save_file"), ("saving", "write"), ("saving", "_exchange"), ("os", "rename"),
       ("os", "replace"), ("shutil", "rmtree")]  # every write, rename and removal of a save


def _instrument(kill_after: int | None, log: list):
    """Wrap the save's operations: count them, and end the process after the k-th."""
    modules = {"saving": saving, "os": os, "shutil": shutil}
    for mod, name in OPS:
        real = getattr(modules[mod], name)

        def op(*args, _real=real, _name=name, **kw):
            out = _real(*args, **kw)
            log.append(_name)
            if len(log) == kill_after:
                os._exit(9)
            return out
        setattr(modules[mod], name, op)


def killed_save(model, directory, processor, skip, kill_after: int, atomic: bool) -> int:
    """save_pretrained in a forked child that dies after operation `kill_after`."""
    pid = os.fork()
    if pid == 0:
        try:
            if not atomic:
                saving._exchange = lambda a, b: False  # the two-rename path of other systems
            _instrument(kill_after, [])
            save_pretrained(model, directory, processor, skip=skip)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def operations(model, directory, processor, skip, atomic: bool) -> list[str]:
    log = []
    saved = {(m, n): getattr({"saving": saving, "os": os, "shutil": shutil}[m], n)
             for m, n in OPS}
    try:
        if not atomic:
            saving._exchange = lambda a, b: False
        _instrument(None, log)
        save_pretrained(model, directory, processor, skip=skip)
    finally:
        for (m, n), f in saved.items():
            setattr({"saving": saving, "os": os, "shutil": shutil}[m], n, f)
    return log


def state(directory):
    model, _ = load_pretrained(directory, dtype="float32")
    return model.state_dict(), load_skip_config(directory)


@pytest.mark.parametrize("atomic", [True, False], ids=["renameat2", "two renames"])
def test_a_save_killed_after_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, atomic):
    old_model, processor = tiny_model()
    new_model = randomize_(tiny_model()[0], 1)
    skip = SkipConfig(retained=2, skipped=1)
    target = tmp_path / "ckpt"
    save_pretrained(old_model, tmp_path / "probe", processor)  # then a replacing save:
    steps = operations(new_model, tmp_path / "probe", processor, skip, atomic)
    assert "save_file" in steps and ("_exchange" in steps or "rename" in steps), steps
    seen = set()
    for k in range(1, len(steps) + 1):
        shutil.rmtree(target, ignore_errors=True)
        save_pretrained(old_model, target, processor)
        assert killed_save(new_model, target, processor, skip, k, atomic) == 9
        weights, skip_back = state(target)
        old = all(torch.equal(v, old_model.state_dict()[n]) for n, v in weights.items())
        new = all(torch.equal(v, new_model.state_dict()[n]) for n, v in weights.items())
        assert old != new, f"killed after step {k} ({steps[k - 1]}): a mix of old and new"
        assert skip_back == (skip if new else None), "skip_config.json from the other save"
        seen.add("new" if new else "old")
        save_pretrained(old_model, target, processor)  # the next save clears the leftovers
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "probe"]
    assert seen == {"old", "new"}  # the kill points cover both sides of the swap


def test_a_folder_that_is_not_a_checkpoint_is_refused_not_overwritten(tmp_path):
    model, processor = tiny_model()
    (tmp_path / "run" / "step-0000001").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    for folder in (tmp_path / "run", tmp_path / "notes"):
        with pytest.raises(CheckpointError, match="not a checkpoint folder"):
            save_pretrained(model, folder, processor)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "run" / "step-0000001").is_dir()
