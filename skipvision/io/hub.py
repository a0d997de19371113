"""Where checkpoint files come from, and reading tensors out of them one at a time.

`fetch` turns a Hub repo id or a local directory into a local directory. Hub downloads go
through `huggingface_hub.snapshot_download` with only the files a LLaVA needs, so its cache
(`HF_HUB_CACHE`), offline mode (`HF_HUB_OFFLINE=1`), tokens (`HF_TOKEN`, `hf auth login`) and
progress bars behave as they do everywhere else. Weights are safetensors when the repo has
them; pickled `.bin` files are fetched only when it has none, and read with
`torch.load(weights_only=True)`.

`tensor_index` reads only headers (names, dtypes, shapes); `read_tensors` then reads each
tensor's bytes straight into its own buffer, so a checkpoint is never held twice.

Nothing is read from outside the checkpoint folder: every file name (an index's shard names
included) must be a plain name in the folder, and a link must resolve inside it (or, in a Hub
cache snapshot, into the repo's `blobs/`). A safetensors index names safetensors shards only,
never a pickle. Safetensors headers are checked as the format's specification requires:
a JSON object without duplicate names, known dtypes, offsets that match each tensor's dtype and
shape and tile the data area exactly (contiguous, no overlap, no hole, no trailing bytes).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .saving import recover

META_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
              "processor_config.json", "chat_template.json", "skip_config.json"]
SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
PICKLES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]

# safetensors dtype names (the format's spec) -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20  # bytes; a larger safetensors header is corrupt


def fetch(repo_or_dir, revision: str | None = None, *, weights: bool = True, token=None,
          cache_dir=None, offline: bool | None = None) -> Path:
    """A local directory holding the checkpoint's config, tokenizer and (if `weights`) weights.

    `repo_or_dir` is an existing directory (used as is) or a Hub repo id ("org/name").
    `offline=None` follows `HF_HUB_OFFLINE`; True never touches the network.
    """
    name = str(repo_or_dir)
    path = Path(os.path.expanduser(name))
    recover(path)  # a local checkpoint caught in the middle of a killed save_pretrained
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{name!r} is a local directory; `revision` ({revision!r}) "
                                  "only applies to Hub repos")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name!r} is neither a checkpoint directory (it does not exist or "
                              "is a file) nor a Hub repo id like 'llava-hf/llava-1.5-7b-hf'")
    hub = dict(token=token, cache_dir=cache_dir, offline=offline)
    root = _download(name, revision, META_FILES + (SAFETENSORS if weights else []), **hub)
    if weights and not _weight_files(root, SAFETENSORS):  # no safetensors: the pickles, then
        root = _download(name, revision, META_FILES + PICKLES, **hub)
    return root


def _download(repo_id, revision, patterns, token, cache_dir, offline) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      token=token, cache_dir=cache_dir, local_files_only=offline))
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is neither a local directory nor a valid Hub repo "
                              f"id ({e})") from None
    except GatedRepoError:
        raise CheckpointError(f"{where} is gated: accept its terms on the Hub, then log in "
                              "(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no model repo {repo_id!r} on the Hub (or it is private: log in "
                              "with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"repo {repo_id!r} has no revision {revision!r} (a branch, tag or "
                              "commit hash)") from None
    except LocalEntryNotFoundError:
        cache = cache_dir or constants.HF_HUB_CACHE
        why = ("offline mode is on (HF_HUB_OFFLINE=1 or offline=True)" if offline else
               "the Hub could not be reached")
        raise CheckpointError(
            f"{where} is not in the Hugging Face cache ({cache}) and {why}; download it once "
            "online, point HF_HUB_CACHE at a cache that holds it, or pass a local directory"
        ) from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {path.parent}; a checkpoint needs it "
                              "(an incomplete download? fetch it again online)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


def in_folder(root: Path, name, what: str = "") -> Path:
    """root / name, refused unless `name` is a plain file name and the file (after links)
    lies in `root`, or in the repo's blobs/ when `root` is a Hub cache snapshot."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(
        c in name for c in "/\\\0") and ":" not in name
    if not plain:
        raise CheckpointError(f"{what or root}: {name!r} is not a plain file name in the "
                              "checkpoint folder; nothing outside it is read")
    path, base = root / name, root.resolve()
    real = path.resolve()
    blobs = (root.parent.parent / "blobs").resolve() if root.parent.name == "snapshots" else None
    if path.exists() and not (real.is_relative_to(base) or (blobs and real.parent == blobs)):
        raise CheckpointError(f"{path} links to {real}, outside the checkpoint folder; "
                              "nothing outside it is read")
    return path


def _weight_files(root: Path, patterns) -> list[Path]:
    """The weight files of one format (safetensors or pickles), shards in index order."""
    single, index = in_folder(root, patterns[0]), in_folder(root, patterns[1])
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map' object")
        suffix = patterns[0].rpartition(".")[2]
        shards = sorted(set(map(str, weight_map.values())))
        for s in shards:
            in_folder(root, s, str(index))
            if not s.endswith("." + suffix):
                raise CheckpointError(f"{index} names {s!r}; a {index.name} names .{suffix} "
                                      "shards only")
        absent = [s for s in shards if not (root / s).is_file()]
        if absent:
            raise CheckpointError(f"{index.name} in {root} names shards that are missing: "
                                  f"{absent} (an incomplete download? fetch it again online)")
        return [root / s for s in shards]
    return [single] if single.is_file() else []


def weight_files(root: Path) -> list[Path]:
    """safetensors if present, else `.bin` pickles; an error if neither exists."""
    files = _weight_files(root, SAFETENSORS) or _weight_files(root, PICKLES)
    if not files and (root / ".metadata").is_file():  # torch.distributed.checkpoint's index
        raise CheckpointError(f"{root} is a sharded training checkpoint: its weights are in "
                              "per-process shards; make a model folder of it with "
                              f"`python examples/consolidate.py {root} OUT`")
    if not files:
        raise CheckpointError(f"no weights in {root}: expected model.safetensors, sharded "
                              "model-*-of-*.safetensors with model.safetensors.index.json, or "
                              f"pytorch_model*.bin; found {sorted(p.name for p in root.iterdir())}")
    return files


@dataclass
class TensorInfo:
    """Where one stored tensor lives: key, file, dtype, shape and (safetensors) byte range."""
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset in a safetensors file
    stop: int = 0
    lazy: torch.Tensor | None = None  # a memory-mapped tensor from a pickle


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate names {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names -> TensorInfo from a safetensors file's header, validated as the format's
    specification requires (see the module docstring) against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER):
            raise CheckpointError(f"{path} is not a safetensors file or is truncated (size "
                                  f"{size} bytes, header length field {n})")
        text = f.read(n)
    try:
        if not text.startswith(b"{"):
            raise ValueError("it does not start with '{'")
        header = json.loads(text.decode("utf-8").rstrip(" "), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    out, data, spans = {}, 8 + n, []
    for name, h in header.items():
        ok = isinstance(h, dict) and h.get("dtype") in DTYPES and _ints(h.get("shape")) and (
            _ints(h.get("data_offsets")) and len(h["data_offsets"]) == 2)
        if not ok or min(h["shape"], default=0) < 0:
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}: {h!r:.200}")
        dtype, shape, (start, stop) = DTYPES[h["dtype"]], tuple(h["shape"]), h["data_offsets"]
        if stop - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: header of {name!r} says shape {list(shape)} "
                                  f"{h['dtype']} but gives {stop - start} bytes")
        spans.append((start, stop, name))
        out[name] = TensorInfo(name, path, dtype, shape, data + start, data + stop)
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise CheckpointError(f"{path}: the bytes of {name!r} start at {start}, not at "
                                  f"{end} where the tensor before ends (overlap or hole)")
        end = stop
    if data + end != size:
        raise CheckpointError(f"{path} is {'truncated' if data + end > size else 'too long'}:"
                              f" its tensors need {data + end} bytes, the file has {size}")
    return out


def pickle_header(path: Path) -> dict[str, TensorInfo]:
    """Names -> TensorInfo of a `.bin` state dict, loaded lazily (mmap) with weights_only."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be memory-mapped
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise CheckpointError(f"cannot read {path} as a PyTorch state dict with "
                              f"weights_only=True (corrupt, truncated, or it pickles code, "
                              f"which is never run): {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return {k: TensorInfo(k, path, v.dtype, tuple(v.shape), lazy=v) for k, v in sd.items()}


def tensor_index(files: list[Path]) -> dict[str, TensorInfo]:
    """Every stored tensor of a (possibly sharded) checkpoint, by checkpoint key."""
    out = {}
    for path in files:
        header = safetensors_header(path) if path.suffix == ".safetensors" else pickle_header(path)
        for name, info in header.items():
            if name in out:
                raise CheckpointError(f"{name!r} is stored twice: in {out[name].file.name} and "
                                      f"{path.name}")
            out[name] = info
    return out


def read_tensor(info: TensorInfo, f=None) -> torch.Tensor:
    """The tensor's data, in its own freshly allocated CPU memory (stored dtype)."""
    if info.lazy is not None:
        return info.lazy.clone()
    buf = torch.empty(info.stop - info.start, dtype=torch.uint8)
    with open(info.file, "rb") if f is None else nullcontext(f) as fh:
        fh.seek(info.start)
        got = fh.readinto(buf.numpy()) if buf.numel() else 0
    if got != buf.numel():
        raise CheckpointError(f"{info.file} is truncated: read {got} of {buf.numel()} bytes")
    return buf.view(info.dtype).reshape(info.shape)

