"""Fully sharded data parallel (`runtime.sharding=fsdp`): torch's FSDP2 (`fully_shard`) applied by
this module, the same code on GPUs (NCCL) and on CPUs (gloo), so the two-process CPU tests run
the path a multi-GPU run takes.

    torchrun --nproc_per_node 8 -m pipeline.commands.cli run pretrain --config ... runtime.sharding=fsdp

Each transformer block is one FSDP unit (the model's own `_no_split_modules`, or the classes of
`runtime.fsdp_layers`), and the model itself is the root unit: parameters, gradients and AdamW's
moments are split across the processes, and a block's parameters are gathered only while it
computes. What leaves a process whole goes through `torch.distributed.checkpoint`: the published
model is gathered on the main process (`full_state_dict`), and a resume state's optimizer state is
written by every process, each its own shard (`save_optimizer_shards`).

Sharding needs a process group (torchrun or accelerate launch); a single process without one has
nothing to split and trains as usual.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

from pipeline.errors import UserError


def active(sharding: str) -> bool:
    """Whether `runtime.sharding` shards this run: fsdp, with a process group to shard over."""
    return sharding == "fsdp" and dist.is_available() and dist.is_initialized()


def layer_classes(model: nn.Module, configured: list[str]) -> list[str]:
    """The classes sharded one unit each: `runtime.fsdp_layers`, else the `_no_split_modules` of
    the transformers models in `model`. A configured class the model lacks is refused; a model
    without transformer layers (a value head) is a single unit."""
    present = {type(module).__name__ for module in model.modules()}
    declared = {name for module in model.modules()
                for name in getattr(module, "_no_split_modules", None) or []}
    own = sorted(declared & present)
    if not own:
        return []
    missing = [name for name in configured if name not in present]
    if missing:
        raise UserError(f"runtime.fsdp_layers names {', '.join(missing)}, which "
                        f"{type(model).__name__} does not contain (its own layer classes: "
                        f"{', '.join(own) or 'none'}); leave runtime.fsdp_layers empty to shard "
                        f"the model's own layers, or name one of them")
    return list(configured) or own


def check_layers(runtime, role: str, model: Callable[[], nn.Module]) -> None:
    """Refuse, before anything is written, `runtime.fsdp_layers` classes that the model lacks.

    `model` gives the module (an empty one from `pipeline.models.empty_model` will do); it is only
    called when a sharded run names its layer classes. The message names `role`, the setting that
    gave the model."""
    if runtime.sharding != "fsdp" or not runtime.fsdp_layers:
        return
    try:
        layer_classes(model(), runtime.fsdp_layers)
    except UserError as err:
        raise UserError(f"{role}: {err}") from None


def shard(model: nn.Module, configured_layers: list[str], device: torch.device) -> nn.Module:
    """Shard `model` in place over every process: one FSDP unit per layer class, then the root."""
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    names = set(layer_classes(model, configured_layers))
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def prepare(accelerator, *objects) -> list:
    """`accelerator.prepare` of each object, except a sharded model, which stays as it is
    (accelerate would wrap it in DDP)."""
    return [obj if is_sharded(obj) else accelerator.prepare(obj) for obj in objects]


@contextmanager
def gathered(model: nn.Module):
    """Every parameter of a sharded model whole on every process for the block, then split again.

    For generation: processes sample answers of different lengths, so the per-block gathers that
    a sharded forward pass makes would not line up between them (the one that stops first would
    leave the others waiting). A model that is not sharded passes through.
    """
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's weights on the main process (CPU tensors; empty elsewhere). Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def save_optimizer_shards(optimizers: dict, modules: dict[str, nn.Module], directory: Path) -> None:
    """Every process writes its shard of each optimizer's state into `directory`. Collective."""
    state = {name: get_optimizer_state_dict(modules[name], _unwrapped(optimizer))
             for name, optimizer in optimizers.items()}
    dcp.save(state, checkpoint_id=str(directory))


def load_optimizer_shards(optimizers: dict, modules: dict[str, nn.Module], directory: Path) -> None:
    """Read each process's shard of the optimizers' state written by `save_optimizer_shards`."""
    state = {name: get_optimizer_state_dict(modules[name], _unwrapped(optimizer))
             for name, optimizer in optimizers.items()}
    dcp.load(state, checkpoint_id=str(directory))
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(modules[name], _unwrapped(optimizer), state[name])
