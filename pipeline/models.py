"""Build a Llama-architecture model from a size preset, or load one from a reference.

A reference is anything `Registry.resolve` accepts (run id, `STAGE:latest`, `RUN@step`, alias, a
local Hugging Face directory, or a hub name). Registry checkpoints are verified against their
manifest before loading. LoRA adapters (peft) are applied and loaded here too.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from pickle import UnpicklingError  # torch's weights_only refusal; nothing here unpickles

import torch
from pipeline.config import LoraConfig, remote_code_warning
from pipeline.errors import UserError, first_line
from pipeline.guard import ADAPTER_CONFIG, require_causal_lm
from pipeline.registry import Resolved, adapter_base

# hidden, layers, heads, intermediate, vocab, context
PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=384, vocab_size=2048, max_position_embeddings=256),
    "small": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  intermediate_size=1408, vocab_size=8192, max_position_embeddings=512),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=2048, vocab_size=32000, max_position_embeddings=1024),
}


def preset_config(preset: str, tokenizer):
    """A LlamaConfig for the preset, sized to the tokenizer, dropout off."""
    from transformers import LlamaConfig
    if preset not in PRESETS:
        raise UserError(f"unknown model preset '{preset}'; choose one of {', '.join(PRESETS)}")
    shape = dict(PRESETS[preset], vocab_size=len(tokenizer))
    return LlamaConfig(**shape, attention_dropout=0.0, tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")


def empty_model(source: str | None = None, preset: str | None = None,
                trust_remote_code: bool = False):
    """The module tree of a causal LM, built on the meta device (no weights, no memory): the model
    at `source` (a directory, a LoRA adapter's base, or a hub name), or a new one of `preset`."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
    if source is None:
        config = LlamaConfig(**PRESETS[preset])
    else:
        base = adapter_base(Path(source)) if (Path(source) / ADAPTER_CONFIG).is_file() else None
        config = AutoConfig.from_pretrained(base or source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def build_from_preset(preset: str, tokenizer, seed: int, dtype: torch.dtype = torch.float32):
    """A new model of the preset, initialized from `seed` (in float32, then held in `dtype`)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(preset_config(preset, tokenizer)).to(dtype)
    _set_generation_ids(model, tokenizer)
    return model


@contextmanager
def loading_errors(what: str, path: str):
    """What transformers, safetensors or torch raise on a damaged or foreign model directory, as
    one UserError line: `cannot load WHAT from PATH: why`."""
    from safetensors import SafetensorError

    try:
        yield
    except UnpicklingError:  # torch's weights_only refusal: the pickle holds more
        raise UserError(f"cannot load {what} from {path}: its pickled weights hold more than "
                        f"tensors, and pickles can run code, so they are refused; convert the "
                        f"weights to safetensors") from None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise UserError(f"cannot load {what} from {path}: {first_line(err)}") from None


def load_causal_lm(resolved: Resolved, *, trust_remote_code: bool = False,
                   trainable_adapter: bool = True, role: str = "model",
                   dtype: torch.dtype = torch.float32):
    """Load a causal LM (full model or peft adapter directory) for training or sampling, its
    weights in `dtype`; `role` names the setting that gave it, for the guard's messages (a reward
    model is refused)."""
    from transformers import AutoModelForCausalLM
    path = require_causal_lm(resolved, role, trust_remote_code)
    warn_remote_code(trust_remote_code)
    adapter = Path(path) / ADAPTER_CONFIG
    with loading_errors("a causal LM", path):
        if adapter.exists():
            return _load_adapter(path, adapter, trust_remote_code, trainable_adapter, role, dtype)
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                    revision=resolved.revision, dtype=dtype)


def _load_adapter(path: str, adapter_file: Path, trust_remote_code: bool, trainable: bool,
                  role: str, dtype: torch.dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_name = adapter_base(adapter_file.parent)
    if base_name is None:
        raise UserError(f"{adapter_file}: no base_model_name_or_path; restore the file")
    base_ref = Resolved(base_name, revision=json.loads(adapter_file.read_text()).get("revision"))
    base_path = require_causal_lm(base_ref, f"{role} (the adapter's base)", trust_remote_code,
                                  adapter=False)
    base = AutoModelForCausalLM.from_pretrained(base_path, trust_remote_code=trust_remote_code,
                                                revision=base_ref.revision, dtype=dtype)
    model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
    # Where the base is now (a relative path in the file is relative to the adapter): a resumed
    # adapter saved elsewhere names it from there.
    model.peft_config["default"].base_model_name_or_path = base_path
    return model


def apply_lora(model, lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with a fresh LoRA adapter when enabled (base weights frozen)."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"lora.target_modules {lora.target_modules} do not fit this model: "
                        f"{first_line(err)}") from None


def merge_adapter(model):
    """A plain model with the adapter folded into its weights (for export)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them
    (`train.gradient_checkpointing`). Non-reentrant checkpointing: it needs no input that requires
    gradients, so it works with frozen embeddings (LoRA) and keeps FSDP2's hooks outside the
    recomputed part. transformers checkpoints only modules in train mode."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"train.gradient_checkpointing: {type(model).__name__} does not support "
                        f"gradient checkpointing; set train.gradient_checkpointing=false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def without_dropout(model):
    """The model in train mode with every dropout probability 0, so it computes what eval mode
    does: for models that never drop out but need train mode for gradient checkpointing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model.train()


def warn_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code:
        remote_code_warning()


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None


def count_parameters(model, trainable_only: bool = False) -> int:
    """The model's parameters (only those that train, with `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def inner_model(model):
    """The transformers model inside DDP and peft wrappers."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def own_storage(model) -> None:
    """Give every CPU parameter of `model` an allocation of its own (64-byte aligned).

    Weights loaded from safetensors can be views into the file's buffer, at offsets of any
    alignment, and CPU matrix kernels round differently by alignment. A resumed run loads its
    trained model from the resume state, the uninterrupted run from its parent or built it in
    memory; without this they would part in the last bit a few steps after the resume point.
    """
    for param in model.parameters():
        if param.device.type == "cpu" and param.data_ptr() % 64:
            param.data = param.data.clone()
