"""Write a checkpoint folder in the llava-hf layout, replacing an old one as a whole.

`save_pretrained` writes every file into a sibling folder `.NAME.saving-*`, flushes it to
disk, then swaps it with the target in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`;
elsewhere two renames). Until the swap the old checkpoint loads; after it, the new one; never
a mix. The swapped-out old folder is then deleted; if the process dies first, or dies while
writing, the leftover sibling is recognised and cleared by the next save (and a checkpoint
caught between the two renames is moved back by the next save or load). The target ends up
holding exactly the files written: config.json, model.safetensors, the processor's files,
skip_config.json when Skip-Vision settings are given, and any `files` passed.

Because the whole folder is replaced, a folder that does not look like a checkpoint (no
config.json, or subfolders) is refused rather than overwritten.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from .hf_config import to_hf

LM_HEAD = "language_model.lm_head.weight"  # tied to the embedding: stored once, as it


def save_pretrained(model, directory, processor=None, skip=None,
                    files: dict[str, str | bytes | Callable[[Path], None]] | None = None, *,
                    state: dict[str, torch.Tensor] | None = None, staged: Path | None = None
                    ) -> Path:
    """Write `model` (and the processor's tokenizer and preprocessing, and `skip` as
    skip_config.json) to `directory`, replacing what was there as a whole.

    `files`: more files for the folder, by name: text, bytes, or a function writing the path.
    `state`: the weights to write instead of `model.state_dict()` (a sharded model's, gathered;
    {}: no model.safetensors). `staged`: a folder from `stage(directory)` that already holds
    files (every process's shards), completed here and swapped in.
    """
    directory = Path(directory)
    if state is None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state = dict(state)
    if model.cfg.text.tie_word_embeddings:
        state.pop(LM_HEAD, None)
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise CheckpointError(f"cannot save parameters that were never loaded (meta): {meta[:5]}")
    dtype = next(iter(state.values()), next(model.parameters())).dtype
    texts = {"config.json": json.dumps(to_hf(model.cfg, str(dtype).removeprefix("torch.")),
                                       indent=2)}
    texts |= {} if processor is None else processor.files()
    if skip is not None:
        texts["skip_config.json"] = json.dumps(asdict(skip), indent=2)
    tmp = staged or stage(directory)
    try:
        if state:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in (texts | (files or {})).items():
            write(tmp / name, content)
        _fsync_folder(tmp)
        swap(tmp, directory)
    finally:
        if tmp.exists():  # a failure before the swap, or the old checkpoint after it
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def stage(directory: Path) -> Path:
    """A new, empty sibling folder to assemble `directory` in (after clearing what killed saves
    left), once it is clear that `directory` may be replaced."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(directory)
    _check_replaceable(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is not
    return tmp


def write(path: Path, content) -> None:
    """One file of the checkpoint: text, bytes, or a function that writes `path`."""
    if callable(content):
        content(path)
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def swap(new: Path, target: Path) -> None:
    """Put folder `new` at `target`; an existing target ends up at `new` (to be deleted)."""
    if not target.exists():
        os.rename(new, target)
    elif not _exchange(new, target):  # no atomic exchange here: two renames
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "old")
        os.rename(new, target)
        os.rename(old / "old", new)
        old.rmdir()
    _fsync_folder(target.parent, files=False)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE); False if unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def recover(directory: Path) -> bool:
    """If a save of `directory` was killed between its two renames (where no atomic exchange
    exists), move the old checkpoint back into place; True if it did."""
    if directory.exists() or not directory.parent.is_dir():
        return False
    for p in sorted(directory.parent.glob(f".{directory.name}.old-*")):
        if (p / "old").is_dir():
            os.rename(p / "old", directory)
            return True
    return False


def clear_leftovers(directory: Path) -> None:
    """Remove what killed saves of `directory` left beside it (`.NAME.saving-*` and
    `.NAME.old-*` folders), after recovering the old checkpoint if it is not in place."""
    recover(directory)
    if not directory.parent.is_dir():
        return
    for p in directory.parent.glob(f".{directory.name}.*-*"):
        if p.name.startswith((f".{directory.name}.saving-", f".{directory.name}.old-")):
            shutil.rmtree(p, ignore_errors=True)


def _check_replaceable(directory: Path) -> None:
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise CheckpointError(f"{directory} exists and is not a folder; save elsewhere")
    if not directory.exists() or not any(directory.iterdir()):
        return
    sub = [p.name for p in directory.iterdir() if p.is_dir()]
    if sub or not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{directory} holds {sub or 'files'} but is not a checkpoint folder (no config.json"
            f"{', or subfolders' if sub else ''}); save_pretrained replaces a folder as a whole, "
            "so save into a new or empty folder")


def _fsync_folder(folder: Path, files: bool = True) -> None:
    paths = [p for p in folder.iterdir() if p.is_file()] if files else []
    for p in paths + [folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
