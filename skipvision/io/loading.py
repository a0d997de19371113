"""Load LLaVA checkpoints (llava-hf and original LLaVA) into `Llava`, and save them.

`load_pretrained`: fetch the files (hub.py), parse the config (hf_config.py), build the model
on the meta device, check every checkpoint key and shape against the model from the file
headers alone (one error naming every missing, unexpected and mis-shaped key), then read each
tensor once into its own memory and assign it (`load_state_dict(assign=True)`): the weights
are never held twice. Tied embeddings are re-tied after assignment.

`save_pretrained` (saving.py) writes the llava-hf layout that this loader and `transformers`
both read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from collections import defaultdict
from pathlib import Path

import torch

from ..config import LlavaConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..skip import SkipConfig
from ..vlm import Llava
from .hf_config import checkpoint_dtype, from_hf, from_original, is_original
from .hub import fetch, in_folder, read_json, read_tensor, tensor_index, weight_files
from .keys import CLIP_PREFIXES, LLAVA_PREFIXES, ORIGINAL_PREFIXES, is_ignored, map_key
from .processor import Processor
from .saving import LM_HEAD

EMBED = "language_model.model.embed_tokens.weight"
DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
               "bfloat16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16, "double": torch.float64, "float": torch.float32,
               "half": torch.float16}


def load_pretrained(repo_id_or_dir, revision: str | None = None, dtype=None, device="cpu", *,
                    token=None, cache_dir=None, offline: bool | None = None,
                    vision_tower=None, tokenizer=None) -> tuple[Llava, Processor]:
    """(model, processor) from a Hub repo id or a local checkpoint directory.

    dtype: None/"auto" = the checkpoint's own (config `dtype`/`torch_dtype`, else as stored).
    device "meta": a llava-hf model's architecture without reading its weights.
    offline: None follows HF_HUB_OFFLINE. vision_tower: overrides the CLIP repo an original
    LLaVA config names (`mm_vision_tower`). tokenizer: a repo or directory whose
    `tokenizer.json` to use (original LLaVA repos ship only a sentencepiece model).
    """
    dtype = torch_dtype(dtype)
    hub = dict(token=token, cache_dir=cache_dir, offline=offline)
    meta = torch.device(device).type == "meta"  # the architecture only (sharded training)
    root = fetch(repo_id_or_dir, revision, weights=not meta, **hub)
    config = read_json(in_folder(root, "config.json"))
    if meta and not is_original(config):  # weights unread: sharded training fills them
        with torch.device("meta"), _no_init():
            model = Llava(_parse(from_hf, config, root))
        processor = Processor.from_dir(model.cfg, root, template=_template(config))
        dtype = dtype or torch_dtype(checkpoint_dtype(config)) or torch.float32
        return model.to(dtype).eval(), processor
    if meta:
        root = fetch(repo_id_or_dir, revision, **hub)
    if not is_original(config):  # llava-hf
        cfg = _parse(from_hf, config, root)
        sources = [(weight_files(root), LLAVA_PREFIXES)]
        processor = Processor.from_dir(cfg, root, template=_template(config))
    else:  # original LLaVA: the vision tower (config, usually weights) is a CLIP repo
        clip_id = vision_tower or config.get("mm_vision_tower")
        if not clip_id:
            raise CheckpointError(f"{root}/config.json has no mm_vision_tower; pass vision_tower=")
        sources = [(weight_files(root), ORIGINAL_PREFIXES)]
        has_tower = any((map_key(k, ORIGINAL_PREFIXES) or "").startswith("vision_tower.")
                        for k in tensor_index(sources[0][0]))
        clip_root = fetch(clip_id, weights=not has_tower, **hub)
        clip = read_json(in_folder(clip_root, "config.json"))
        cfg = _parse(lambda c: from_original(c, clip), config, root)
        if not has_tower:
            sources.append((weight_files(clip_root), CLIP_PREFIXES))
        processor = Processor.from_dir(cfg, root, clip_root, "vicuna_v1",
                                       config.get("image_aspect_ratio") == "pad")
    if tokenizer is not None:
        processor.tokenizer = Processor.from_dir(cfg, fetch(tokenizer, weights=False, **hub)
                                                 ).tokenizer
    model = load_model(cfg, sources, dtype or checkpoint_dtype(config), device,
                       str(repo_id_or_dir))
    return model, processor


def _template(config: dict) -> str:
    """The chat template of a llava-hf checkpoint, from its model cards: LLaVA-1.5 "llava";
    LLaVA-NeXT by its language model (Mistral, Yi-34B's 64k vocabulary, or Vicuna)."""
    if config.get("model_type") != "llava_next":
        return "llava"
    text = config.get("text_config") or {}
    if text.get("model_type") == "mistral":
        return "mistral_instruct"
    return "chatml" if text.get("vocab_size", 0) >= 64000 else "vicuna_next"


def _parse(parse, config: dict, root: Path) -> LlavaConfig:
    if config.get("model_type") not in ("llava", "llava_llama", "llava_next"):
        raise CheckpointError(
            f"{root}/config.json describes a {config.get('model_type')!r} model "
            f"({config.get('architectures')}); skipvision loads LLaVA checkpoints: llava-hf "
            "(model_type 'llava', LlavaForConditionalGeneration) or original LLaVA (mm_* fields)")
    try:
        return parse(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{root}/config.json: {e}") from None


def torch_dtype(dtype) -> torch.dtype | None:
    """torch dtype from a dtype or its name ("float16", "bf16", ...); None/"auto" -> None."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def load_model(cfg: LlavaConfig, sources, dtype=None, device="cpu", where: str = "") -> Llava:
    """Build on meta, check all keys from headers, then read and assign each tensor once.

    sources: [(weight files, prefix table)], earlier sources first; a later source only
    fills parameters the earlier ones lack (the CLIP repo of an original LLaVA checkpoint).
    """
    with torch.device("meta"), _no_init():
        model = Llava(cfg)
    plan = _plan(model, sources, cfg.text.tie_word_embeddings, where)
    dtype = torch_dtype(dtype)
    if dtype is None:  # as stored: the first floating tensor decides
        dtype = next(i.dtype for i in plan.values() if i.dtype.is_floating_point)
    if torch.device(device).type == "meta":  # keys checked, weights left for sharded training
        return model.to(dtype).eval()
    state = {}
    by_file = defaultdict(list)
    for name, info in plan.items():
        by_file[info.file].append((info.start, name, info))
    for file, items in by_file.items():
        with open(file, "rb") as f:
            for _, name, info in sorted(items, key=lambda t: t[0]):  # sequential reads
                t = read_tensor(info, f).to(device=device, dtype=dtype)
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{file}: {info.key} holds NaN or inf (as {dtype}); "
                                          "these weights would give no answer")
                state[name] = t
    tied = cfg.text.tie_word_embeddings
    if tied:
        state[LM_HEAD] = state[EMBED]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: still on the meta device after loading: {left}")
    return model.eval()


@contextlib.contextmanager
def _no_init():
    """Skip weight init while building on meta: it computes nothing there, but torch's meta
    `normal_` imports its Python decompositions (~800 modules, ~75 MB resident, ~1 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "constant_",
             "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _plan(model: Llava, sources, tied: bool, where: str) -> dict:
    """Our parameter name -> TensorInfo; raises one CheckpointError listing every problem."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        del expected[LM_HEAD]  # stored once, as the embedding (transformers drops the alias)
    plan, unexpected, misshaped, bad = {}, [], [], set()
    for i, (files, prefixes) in enumerate(sources):
        for key, info in tensor_index(files).items():
            name = map_key(key, prefixes)
            if is_ignored(key) or (tied and name == LM_HEAD):
                continue
            if name in plan and i > 0:
                continue  # already given by the main checkpoint
            where_ = info.file.name
            if name is None or name not in expected or name in plan:
                unexpected.append(f"{key} (in {where_})")
            elif not info.dtype.is_floating_point:
                misshaped.append(f"{key} (in {where_}): stored as "
                                 f"{str(info.dtype).removeprefix('torch.')}, but LLaVA weights "
                                 "are floating point")
                bad.add(name)
            elif info.shape != expected[name]:
                misshaped.append(f"{key} (in {where_}): checkpoint {list(info.shape)}, model "
                                 f"{list(expected[name])}")
                bad.add(name)
            else:
                plan[name] = info
    missing = [k for k in expected if k not in plan and k not in bad]
    if missing or unexpected or misshaped:
        parts = [f"checkpoint {where or sources[0][0][0].parent} does not fit the model its "
                 "config describes (is config.json from the same checkpoint?):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected),
                            ("mis-shaped", misshaped)):
            if keys:
                parts.append(f"  {title} ({len(keys)}):\n" + "\n".join(
                    f"    {k}" for k in compact(keys)))
        raise CheckpointError("\n".join(parts))
    return plan


def compact(keys: list[str]) -> list[str]:
    """Every key, with runs of one layer index folded: `layers.{0-31}.mlp.up_proj.weight`."""
    groups = defaultdict(list)  # key with its first index replaced by "\0" -> the indices
    for k in keys:
        m = re.search(r"\.(\d+)\.", k)
        if m is None:
            groups[k].append(None)
        else:
            groups[k[:m.start()] + ".\0." + k[m.end():]].append(int(m.group(1)))
    out = []
    for pattern, nums in groups.items():
        if nums == [None]:
            out.append(pattern)
            continue
        runs = []
        for n in sorted(nums):
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        span = ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
        out.append(pattern.replace("\0", span if len(nums) == 1 else "{" + span + "}"))
    return out


def load_skip_config(repo_id_or_dir, revision: str | None = None, **hub) -> SkipConfig | None:
    """The Skip-Vision settings a checkpoint was saved with (skip_config.json), or None."""
    path = in_folder(fetch(repo_id_or_dir, revision, weights=False, **hub), "skip_config.json")
    if not path.is_file():
        return None
    d = read_json(path)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(SkipConfig)})
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {unknown}; known: "
                              f"{[f.name for f in dataclasses.fields(SkipConfig)]}")
    try:
        return SkipConfig(**d)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
