"""The explicit list of stages: name, module, and the upstream stages each one reads.

Adding a stage is one module exposing `Config` and `run(config, registry, ...)`, one line here,
and one `configs/tiny/<stage>.yaml`; a test checks all three exist. Modules are imported lazily so
that `rlhf --help` never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    upstream: tuple[str, ...]
    summary: str

    def load(self):
        return importlib.import_module(self.module)


STAGES = {stage.name: stage for stage in (
    Stage("pretrain", "stages.pretrain", (), "train a causal LM on a text corpus"),
    Stage("sft", "stages.sft", ("pretrain",), "fine-tune on instruction → answer pairs"),
    Stage("reward", "stages.reward", ("sft",), "train a reward model on ranked answers"),
    Stage("ppo", "stages.ppo.trainer", ("sft", "reward"), "PPO against the reward model"),
)}
