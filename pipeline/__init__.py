"""rlhf-pipeline: the InstructGPT recipe (pretrain → sft → reward → ppo) as one tool.

`pipeline` is the library the stages share (configs, the checkpoint registry, the runtime and
training loop, models, tokenizer, data, the embedded world); `pipeline.commands` holds the `rlhf`
commands on top; `stages` holds one module per stage. The library never imports either.
"""

__version__ = "0.1.0"
