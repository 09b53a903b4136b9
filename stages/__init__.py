"""The explicit list of stages: name, module, and the inputs each one takes from upstream stages.

This is the one definition of the stage graph: `inputs` maps each parent role of a stage (the
name its lineage records) to the stage whose output fills it. The pipeline chains the stages in
this order and hands each one its inputs.

Adding a stage is one module (or package) exposing `Config` and `run(config, registry, ...)`, one
line here, and one `configs/tiny/<stage>.yaml`; a test checks all three exist. Modules are imported
lazily so that `rlhf --help` never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    summary: str  # one line for `rlhf run --help`
    inputs: dict[str, str] = field(default_factory=dict)  # parent role -> upstream stage

    def load(self):
        return importlib.import_module(self.module)


STAGES = {stage.name: stage for stage in (
    Stage("pretrain", "stages.pretrain", "train a causal LM on a text corpus"),
    Stage("sft", "stages.sft", "fine-tune on instruction → answer pairs", {"model": "pretrain"}),
    Stage("reward", "stages.reward", "train a reward model on ranked answers", {"model": "sft"}),
    Stage("ppo", "stages.ppo", "PPO against the reward model",
          {"policy": "sft", "reward": "reward"}),
)}
