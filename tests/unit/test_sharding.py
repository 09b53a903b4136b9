"""Unit tests of what sharded training decides without processes: which classes become FSDP
units, and which resume states a launch may continue."""

from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.config import RuntimeConfig
from pipeline.errors import UserError
from pipeline.models import empty_model
from pipeline.runtime import ResumePoint, check_processes
from pipeline.sharding import check_layers, layer_classes
from stages.ppo.models import TokenScorer, ValueHead


def llama_config(**extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, vocab_size=32, **extra)


def test_units_are_the_models_own_layers_unless_configured():
    model = LlamaForCausalLM(llama_config())
    assert layer_classes(model, []) == ["LlamaDecoderLayer"]
    assert layer_classes(model, ["LlamaMLP"]) == ["LlamaMLP"]
    # A wrapper without _no_split_modules of its own: the layers of the model inside it.
    scorer = TokenScorer(LlamaForSequenceClassification(llama_config(num_labels=1)))
    assert layer_classes(scorer, []) == ["LlamaDecoderLayer"]
    assert layer_classes(ValueHead(16), ["LlamaDecoderLayer"]) == []  # one unit, no layers


def test_a_layer_class_the_model_lacks_is_refused_with_its_own():
    with pytest.raises(UserError, match=r"runtime.fsdp_layers names GPT2Block, which "
                                        r"LlamaForCausalLM does not contain \(its own layer "
                                        r"classes: LlamaDecoderLayer\)"):
        layer_classes(LlamaForCausalLM(llama_config()), ["LlamaDecoderLayer", "GPT2Block"])


def test_configured_layers_are_checked_on_an_empty_model_before_anything_loads(tmp_path):
    source = tmp_path / "model"
    LlamaForCausalLM(llama_config()).save_pretrained(source)
    sharded = RuntimeConfig(sharding="fsdp", fsdp_layers=["LlamaDecoderLayer"])
    check_layers(sharded, "model.source", lambda: empty_model(str(source)))
    check_layers(sharded, "model.preset", lambda: empty_model(preset="tiny"))
    wrong = RuntimeConfig(sharding="fsdp", fsdp_layers=["GPT2Block"])
    with pytest.raises(UserError, match=r"^model.source: runtime.fsdp_layers names GPT2Block"):
        check_layers(wrong, "model.source", lambda: empty_model(str(source)))
    # Unsharded, or sharded by the model's own layers: nothing to check, nothing built.
    for runtime in (RuntimeConfig(fsdp_layers=["GPT2Block"]), RuntimeConfig(sharding="fsdp")):
        check_layers(runtime, "model.source", lambda: pytest.fail("the model was built"))
    assert next(empty_model(str(source)).parameters()).is_meta


def resume_point(processes):
    return ResumePoint(step=4, path=Path("state/step-4"), extra={}, processes=processes)


def test_a_state_resumes_only_with_the_processes_that_wrote_it():
    check_processes("pretrain", "pretrain-1", None, 4)  # nothing to resume
    check_processes("pretrain", "pretrain-1", resume_point(2), 2)
    check_processes("pretrain", "pretrain-1", resume_point(None), 3)  # written before it was noted
    with pytest.raises(UserError, match=r"step-4, written by 2 process\(es\); this launch has 1: "
                                        r"launch it with 2 \(torchrun --nproc_per_node 2"):
        check_processes("pretrain", "pretrain-1", resume_point(2), 1)
