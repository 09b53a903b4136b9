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
