"""rlhf-pipeline: the InstructGPT recipe (pretrain → sft → reward → ppo) as one tool.

`pipeline` holds what the stages share: configs, the checkpoint registry, the runtime,
models, data adapters and the embedded world. `stages` holds one module per stage.
"""

__version__ = "0.1.0"
