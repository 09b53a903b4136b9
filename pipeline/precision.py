"""Which dtype each model of a stage is held in, and what a stage's models take in memory.

Two settings decide it: `model.dtype` (the weights the stage loads and trains) and
`runtime.precision` (the mixed-precision autocast the accelerator applies):

    model.dtype   trained weights            frozen models (PPO reference, reward model)
    auto          float32 (master weights)    the compute dtype: bf16 under bf16 autocast
    fp32/bf16/fp16  that dtype                 the compute dtype (that dtype without autocast)

So on a bf16-capable GPU (`runtime.precision=auto` → bf16 autocast) the defaults train float32
master weights and hold the frozen models in bf16, half their float32 size; `model.dtype=bf16`
also halves the trained weights and AdamW's two moments (pure bf16 training).

fp16 weights are refused on a CPU. bf16 runs on every CPU: where the CPU has no native bf16
instructions torch computes it through float32, slower but the same numbers; a note says so.
"""

from __future__ import annotations

import functools
import resource
import sys
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from pipeline.errors import UserError

DtypeChoice = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MIB = 1024 * 1024


@dataclass(frozen=True)
class Precision:
    """The dtypes of a stage: `weights` for what trains, `frozen` for models that never do."""

    weights: torch.dtype
    frozen: torch.dtype

    @classmethod
    def resolve(cls, choice: DtypeChoice, mixed_precision: str, on_cpu: bool) -> "Precision":
        """`choice` is `model.dtype`; `mixed_precision` the accelerator's ("no", "bf16", "fp16")."""
        check_supported(choice, on_cpu)
        weights = torch.float32 if choice == "auto" else DTYPES[choice]
        frozen = DTYPES[mixed_precision] if mixed_precision in DTYPES else weights
        return cls(weights=weights, frozen=frozen)


def check_supported(choice: DtypeChoice, on_cpu: bool) -> None:
    """Refuse a weight dtype the device cannot train in; note an emulated one."""
    if choice == "fp16" and on_cpu:
        raise UserError("model.dtype=fp16 needs a GPU (fp16 weights train without loss scaling "
                        "only there, and a CPU has no fp16 kernels for most layers); use "
                        "model.dtype=bf16 or fp32 on a CPU")
    if choice == "bf16" and not on_cpu and not torch.cuda.is_bf16_supported():
        raise UserError("model.dtype=bf16: this GPU has no bf16 support (it needs compute "
                        "capability 8.0 or newer, e.g. A100, H100); use model.dtype=fp32, or fp16 "
                        "with runtime.precision=fp16")
    if choice == "bf16" and on_cpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        _note_emulated_bf16()


@functools.cache
def _note_emulated_bf16() -> None:
    """Said once per process, however often the stage resolves its dtypes."""
    print("note: model.dtype=bf16 on a CPU without native bf16: torch computes it through "
          "float32 (same results, slower)", file=sys.stderr)


# -- memory ---------------------------------------------------------------------------------------
def parameter_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p.requires_grad or not trainable_only)


def adamw_state_bytes(models: Iterable[nn.Module]) -> int:
    """AdamW's two moments (each the size and dtype of its parameter) of every trained weight."""
    return 2 * sum(parameter_bytes(model, trainable_only=True) for model in models)


def describe_model(name: str, model: nn.Module) -> str:
    """`name 1,234 parameters bf16 2.4 MiB` (every dtype the parameters hold, e.g. a LoRA
    adapter in float32 on a bf16 base)."""
    dtypes = sorted({NAMES.get(p.dtype, str(p.dtype)) for p in model.parameters()})
    count = sum(p.numel() for p in model.parameters())
    return f"{name} {count:,} parameters {'+'.join(dtypes)} {parameter_bytes(model) / MIB:.1f} MiB"


def memory_line(stage: str, models: dict[str, nn.Module], trained: Iterable[nn.Module]) -> str:
    """The line a stage prints before training: each model's size, and the optimizer state."""
    parts = [describe_model(name, model) for name, model in models.items()]
    optimizer = adamw_state_bytes(trained) / MIB
    return f"{stage} memory: {'; '.join(parts)}; AdamW state {optimizer:.1f} MiB"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on a GPU, resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
