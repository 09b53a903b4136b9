"""Unit tests of pipeline.precision: which dtype each model is held in, what a stage's memory line
says, and the dtypes a CPU refuses."""

import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.precision import Precision, adamw_state_bytes, describe_model, memory_line


@pytest.mark.parametrize("choice, mixed, weights, frozen", [
    ("auto", "no", torch.float32, torch.float32),    # a CPU: everything float32, as before
    ("auto", "bf16", torch.float32, torch.bfloat16),  # a bf16 GPU: fp32 master, bf16 frozen
    ("bf16", "no", torch.bfloat16, torch.bfloat16),   # pure bf16
    ("fp32", "bf16", torch.float32, torch.bfloat16),
])
def test_trained_and_frozen_dtypes(choice, mixed, weights, frozen):
    precision = Precision.resolve(choice, mixed, on_cpu=True)
    assert (precision.weights, precision.frozen) == (weights, frozen)


def test_fp16_weights_are_refused_on_a_cpu():
    with pytest.raises(UserError, match="model.dtype=fp16 needs a GPU.*bf16 or fp32"):
        Precision.resolve("fp16", "no", on_cpu=True)


def test_memory_line_counts_each_model_and_adamw_state():
    # 1024·256 + 256 = 262,400 parameters: 1,049,600 bytes in float32 (1.0 MiB), half in bf16.
    # AdamW keeps two float32 moments of the trained model only: 2,099,200 bytes (2.0 MiB).
    policy = nn.Linear(1024, 256)
    reference = nn.Linear(1024, 256).to(torch.bfloat16).requires_grad_(False)
    assert adamw_state_bytes([policy, reference]) == 2_099_200
    assert describe_model("reference", reference) == "reference 262,400 parameters bf16 0.5 MiB"
    assert memory_line("ppo", {"policy": policy, "reference": reference}, [policy]) == (
        "ppo memory: policy 262,400 parameters fp32 1.0 MiB; "
        "reference 262,400 parameters bf16 0.5 MiB; AdamW state 2.0 MiB")

