"""The GPU path (skipped where CUDA is absent): bf16 autocast, a stage run on the device, and a
published model that still loads on the CPU in fp32."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_auto_precision_is_bf16_on_a_gpu():
    from pipeline.config import RuntimeConfig
    from pipeline.runtime import make_accelerator
    accelerator = make_accelerator(RuntimeConfig())
    assert accelerator.device.type == "cuda"
    assert accelerator.mixed_precision == ("bf16" if torch.cuda.is_bf16_supported() else "no")


def test_tiny_pretrain_runs_on_the_gpu(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.config import load_config
    from pipeline.registry import Registry
    from stages import pretrain

    config = load_config(pretrain.Config, "configs/tiny/pretrain.yaml",
                         ["train.max_steps=5", "checkpoint.every_steps=2"])
    run = pretrain.run(config, Registry(tmp_path))
    assert run.status == "completed"
    model = AutoModelForCausalLM.from_pretrained(run.model_path)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(),
                    reason="needs a bf16-capable GPU")
def test_auto_dtypes_train_fp32_and_hold_frozen_models_in_bf16():
    from pipeline.config import RuntimeConfig
    from pipeline.precision import Precision
    from pipeline.runtime import mixed_precision

    precision = Precision.resolve("auto", mixed_precision(RuntimeConfig()), on_cpu=False)
    assert (precision.weights, precision.frozen) == (torch.float32, torch.bfloat16)
