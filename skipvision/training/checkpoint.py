"""Training checkpoints: written atomically, found again for an exact resume.

A checkpoint is a folder `OUT/step-NNNNNNN/` in the llava-hf layout (`save_pretrained`:
config.json, model.safetensors with the `summary_scorer.*` keys when the model has them,
tokenizer and preprocessor files), so `load_pretrained` reads it as a model, plus
`trainer_state.pt` (optimizer, schedule, step, RNG; read back with `weights_only=True`) and
`training.json` (the same facts for people). `save_pretrained` assembles the folder beside
its place and swaps it in atomically; `OUT/latest` is a symlink replaced atomically after
that. A crash at any moment therefore leaves the previous checkpoint, and `latest`, whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step-(\d{7})$")


def save_checkpoint(out_dir, step: int, model, processor, trainer_state: dict | None = None,
                    info: dict | None = None, keep_last: int = 0) -> Path:
    """Write OUT/step-NNNNNNN atomically, point OUT/latest at it, prune to `keep_last` (0: all)."""
    from ..io.saving import save_pretrained
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    files = {"training.json": json.dumps({"step": step, **(info or {})}, indent=2)}
    if trainer_state is not None:
        files["trainer_state.pt"] = lambda path: torch.save(trainer_state, path)
    save_pretrained(model, out / name, processor, files=files)
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
