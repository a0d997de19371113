"""Many processes: the process group, FSDP2 sharding, sharded checkpoints, activation
checkpointing.

Without sharding, DistributedDataParallel keeps a whole copy of the weights, gradients and
AdamW state in every process (train.py). With `shard`, FSDP2 keeps 1/N of each in each of N
processes and gathers a unit's full weights only while that unit computes. Units (one
all-gather in forward, one reduce-scatter in backward): the CLIP embeddings, every CLIP encoder
layer, every decoder layer, the token embeddings and the LM head (one unit when tied). The
root unit (`AnswerLoss`) keeps the small rest whole during a step: projector, norms, summary
scorer, LLaVA-NeXT's `image_newline`. Vision layers past the feature layer are units never
gathered. On CUDA, `MixedPrecisionPolicy` replaces autocast: float32 master weights, bfloat16
gathered weights and compute, float32 gradient reduction.

Sharded checkpoints (`save`, `load`) are `torch.distributed.checkpoint` folders: each process
writes its shards and the metadata records global shapes, so a run saved by N processes
resumes on M (or on one process without sharding). `full_state` gathers the whole state dict
to process 0 for the consolidated llava-hf export.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

METADATA = ".metadata"  # torch.distributed.checkpoint's index file of a sharded checkpoint

# Skip-FFN layers return a view of a fresh tensor (index_add then view); FSDP2 warns because an
# in-place op on it would bypass its backward hook. No caller modifies a layer's output in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str | None = None, shard: bool = False) -> Dist:
    """One process, or the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK).
    Sharding needs a process group even alone: then a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world == 1 and not shard:
        return Dist(0, 1, dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        alone = dict(store=dist.HashStore(), rank=0, world_size=1) if world == 1 else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **alone)
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def units(model) -> list[list[nn.Module]]:
    """The modules sharded as one unit each, innermost first (the root unit comes last)."""
    vm, lm = model.vision_tower.vision_model, model.language_model
    out = [[vm.embeddings]] + [[layer] for layer in vm.encoder.layers]
    out += [[layer] for layer in lm.model.layers]
    if model.cfg.text.tie_word_embeddings:  # one parameter in two modules: one unit
        return out + [[lm.model.embed_tokens, lm.lm_head]]
    return out + [[lm.model.embed_tokens], [lm.lm_head]]


def checkpoint_layers(model) -> None:
    """Activation checkpointing: every encoder and decoder layer keeps only its inputs for
    backward and recomputes the rest there (one layer's activations at a time, not all)."""
    vm, lm = model.vision_tower.vision_model, model.language_model
    for layer in [*vm.encoder.layers, *lm.model.layers]:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def mixed_precision(device: torch.device, amp: bool) -> MixedPrecisionPolicy:
    if device.type == "cuda" and amp:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(root: nn.Module, model, device: torch.device, amp: bool = True) -> FSDPModule:
    """Shard `model` (inside `root`, the module whose forward is a step's) over all processes,
    in place; `model` must be on the meta device (then give it weights with `fill` or `load`)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = mixed_precision(device, amp)
    for group in units(model):
        fully_shard(group if len(group) > 1 else group[0], mesh=mesh, mp_policy=mp)
    return fully_shard(root, mesh=mesh, mp_policy=mp)


def fill(model, device: torch.device, full: dict | None) -> bool:
    """Memory on `device` for a sharded model built on meta, and weights from process 0's full
    state dict `full` (the others pass None): a 7B model is read and held whole by process 0
    only. False (weights left empty, for `load`) if process 0 passed None."""
    model.to_empty(device=device)
    have = [full is not None]
    dist.broadcast_object_list(have, src=0)
    if have[0]:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        set_model_state_dict(model, full if dist.get_rank() == 0 else {}, options=opts)
    return have[0]


def full_state(model) -> dict[str, torch.Tensor]:
    """The whole state dict on process 0's CPU ({} elsewhere); every process must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def save(folder: Path, model, optimizer) -> None:
    """Every process writes its shards of the weights and AdamW state into `folder`."""
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder))


def load(folder: Path, model, optimizer=None) -> None:
    """Read a sharded checkpoint, written by any number of processes, into `model` (sharded
    or not) and `optimizer`."""
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        _read(state, folder)
        set_model_state_dict(model, state["model"])
        return
    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": optim}
    _read(state, folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def _read(state: dict, folder: Path) -> None:
    alone = not dist.is_initialized()  # one process reading every shard: expected, not a warning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=alone)


def is_sharded_checkpoint(folder) -> bool:
    return (Path(folder) / METADATA).is_file()


@contextlib.contextmanager
def gathered(root: FSDPModule):
    """The root unit's weights whole outside a step (evaluation); the other units gather
    their own as they run."""
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (of a sharded tensor, its local shard)."""
    total = 0
    for t in tensors:
        if t is not None:
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
    return total
