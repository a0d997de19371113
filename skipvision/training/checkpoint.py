"""Training checkpoints: written atomically, found again for an exact resume.

A checkpoint is a folder `OUT/step-NNNNNNN/` in the llava-hf layout (`save_pretrained`:
config.json, model.safetensors with the `summary_scorer.*` keys when the model has them,
tokenizer and preprocessor files), so `load_pretrained` reads it as a model, plus
`trainer_state.pt` (optimizer, schedule, step, RNG; read back with `weights_only=True`) and
`training.json` (the same facts for people). `save_pretrained` assembles the folder beside
its place and swaps it in atomically; `OUT/latest` is a symlink replaced atomically after
that. A crash at any moment therefore leaves the previous checkpoint, and `latest`, whole.

A sharded run's checkpoint holds, instead of model.safetensors and the optimizer in
trainer_state.pt, every process's shards of both (parallel.py); it resumes on any number of
processes. The run's last checkpoint also holds the consolidated model.safetensors;
`consolidate` makes one of any other.
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
    save_pretrained(model, out / name, processor, files=_files(step, info, trainer_state))
    _point_latest(out, name, keep_last)
    return out / name


def save_sharded_checkpoint(out_dir, step: int, model, optimizer, processor,
                            trainer_state: dict, info: dict | None = None, keep_last: int = 0,
                            export: bool = False) -> Path:
    """Every process: OUT/step-NNNNNNN with each process's shards of the weights and AdamW
    state (parallel.save), the config, processor and trainer state; with `export` also the
    consolidated model.safetensors, so that the folder loads as a model. Atomic as above."""
    import torch.distributed as dist

    from ..io.saving import save_pretrained, stage
    from . import parallel
    out, name, main = Path(out_dir), f"step-{step:07d}", dist.get_rank() == 0
    staged = [stage(out / name) if main else None]
    dist.broadcast_object_list(staged, src=0)
    parallel.save(staged[0], model, optimizer)
    state = parallel.full_state(model) if export else {}
    if main:
        save_pretrained(model, out / name, processor, files=_files(step, info, trainer_state),
                        state=state, staged=staged[0])
        _point_latest(out, name, keep_last)
    dist.barrier()
    return out / name


def consolidate(ckpt, out_dir) -> Path:
    """A sharded checkpoint as one llava-hf model folder (one process, on CPU)."""
    from ..io.loading import load_pretrained
    from ..io.saving import save_pretrained
    from . import parallel
    model, processor = load_pretrained(ckpt, device="meta")
    model.to_empty(device="cpu")
    parallel.load(Path(ckpt), model)
    return save_pretrained(model, out_dir, processor)


def _files(step: int, info: dict | None, trainer_state: dict | None) -> dict:
    files = {"training.json": json.dumps({"step": step, **(info or {})}, indent=2)}
    if trainer_state is not None:
        files["trainer_state.pt"] = lambda path: torch.save(trainer_state, path)
    return files


def _point_latest(out: Path, name: str, keep_last: int) -> None:
    link = out / f".latest-{os.getpid()}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(name, link)
    os.replace(link, out / "latest")
    if keep_last > 0:
        for old in checkpoints(out)[:-keep_last]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


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
