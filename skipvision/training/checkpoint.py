"""Training checkpoints: written atomically, found again for an exact resume.

A checkpoint is a folder `OUT/step-NNNNNNN/` in the llava-hf layout (`save_pretrained`:
config.json, model.safetensors with the `summary_scorer.*` keys when the model has them,
tokenizer and preprocessor files), so `load_pretrained` reads it as a model, plus
`trainer_state.pt` (optimizer, schedule, step, RNG; read back with `weights_only=True`) and
`training.json` (the same facts for people). The folder is assembled under a temporary name
and renamed into place; `OUT/latest` is a symlink replaced atomically after that. A crash at
any moment therefore leaves the previous checkpoint, and `latest`, whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step-(\d{7})$")


def save_checkpoint(out_dir, step: int, model, processor, trainer_state: dict | None = None,
                    info: dict | None = None, keep_last: int = 0) -> Path:
    """Write OUT/step-NNNNNNN atomically, point OUT/latest at it, prune to `keep_last` (0: all)."""
    from ..io.loading import save_pretrained
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is not
    try:
        save_pretrained(model, tmp, processor)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "training.json").write_text(json.dumps({"step": step, **(info or {})}, indent=2))
        _fsync_tree(tmp)
        final = out / name
        if final.exists():  # re-saving a step (e.g. after a resume): swap the old one out
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=out))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    link = out / f".latest-{os.getpid()}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(name, link)
    os.replace(link, out / "latest")
    if keep_last > 0:
        for old in checkpoints(out)[:-keep_last]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return out / name


def _fsync_tree(root: Path):
    for p in root.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def checkpoints(out_dir) -> list[Path]:
    """Complete checkpoint folders in OUT, oldest first (temporary folders are not listed)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def resolve(path) -> Path:
    """A checkpoint folder from itself, from OUT (its `latest`), or an error saying why not."""
    p = Path(path)
    if (p / "trainer_state.pt").is_file():
        return p
    if (p / "latest").exists():
        return (p / "latest").resolve()
    found = checkpoints(p)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no training checkpoint in {p} (expected {p}/latest or "
                            f"{p}/step-NNNNNNN/trainer_state.pt)")


def load_trainer_state(ckpt) -> dict:
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=True)
