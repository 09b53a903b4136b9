"""Tiny models for the exactness tests (shared-prompt scoring, padding-free SFT): a randomly
initialized model of a given family, and the loss and gradients of one backward pass."""

from __future__ import annotations

import torch

from pipeline.models import PRESETS


def tiny_family_model(family: str, attention: str, head: str, **config):
    """A randomly initialized (seed 0) transformers model with a 32-wide, 2-layer body: `family`
    llama (the project's architecture: its tiny preset, scaled down), qwen2 or gpt_neox; attention
    `attention`; `head` an Auto class name, e.g. "AutoModelForCausalLM"; `config` more fields."""
    import transformers

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 vocab_size=40, max_position_embeddings=64, **config)
    if family == "llama":
        model_config = transformers.LlamaConfig(num_key_value_heads=2,
                                                **dict(PRESETS["tiny"], **shape))
    elif family == "qwen2":
        model_config = transformers.Qwen2Config(num_key_value_heads=2, **shape)
    else:
        model_config = transformers.GPTNeoXConfig(**shape)
    model_config._attn_implementation = attention
    torch.manual_seed(0)
    return getattr(transformers, head).from_config(model_config)


def loss_and_grads(model, loss_of) -> tuple[float, dict]:
    """Backpropagate `loss_of(model)` from zeroed gradients: the loss and each parameter's grad."""
    model.zero_grad()
    loss = loss_of(model)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}
