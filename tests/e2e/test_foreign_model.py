"""End to end: the chat recipe (configs/chat, configs/chat-lora) from a model this project did not
build — a Qwen2-architecture model with random weights, its own byte-level BPE tokenizer and a
ChatML template without `{% generation %}` markers that adds a system prompt, as hub chat models
do — through sft → reward → ppo → chat → score → export, all in the registry. Few steps on tiny
shapes: this checks that every stage takes such a model, not what it learns.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from pipeline.commands.cli import main
from pipeline.registry import Registry

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sft"
QUESTION = "How many legs do three chickens have?"
# ChatML as Qwen2 ships it: a default system prompt, turns closed by <|im_end|>, no generation tags.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Every stage a few steps on tiny batches; gold evals and normalization on two prompts.
SHORT = ("sft.train.max_steps=2", "sft.train.batch_size=2", "sft.train.grad_accum=1",
         "sft.train.warmup_steps=0", "sft.train.eval_batches=1", "sft.eval.n_prompts=2",
         "sft.eval.max_new_tokens=8", "reward.train.max_steps=2", "reward.train.batch_size=2",
         "reward.normalize.prompts=2", "reward.normalize.max_new_tokens=8",
         "ppo.train.max_steps=2", "ppo.train.batch_size=4", "ppo.generation.max_new_tokens=8",
         "ppo.eval.n_prompts=2", "ppo.eval.max_new_tokens=8", "ppo.eval.sampled_answers=1",
         "ppo.samples.every_steps=1", "ppo.samples.count=2")


def qwen_style_model(directory: Path) -> Path:
    """A hub-style Qwen2 chat model directory: random weights, its own tokenizer (EOS <|im_end|>,
    pad <|endoftext|>) and the ChatML template above."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [message["content"] for line in (FIXTURES / "conversations.jsonl").open()
             for message in json.loads(line)["messages"]]
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", model_max_length=32768)
    tokenizer.chat_template = QWEN_TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def rlhf(home: Path, *args: str, stdin: str = "") -> tuple[str, str]:
    """`rlhf --home HOME ARGS` in this process: its stdout and stderr (a failure raises)."""
    import contextlib
    import sys

    out, err = io.StringIO(), io.StringIO()
    stdin_before = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--home", str(home), *args])
    finally:
        sys.stdin = stdin_before
    assert code == 0, f"rlhf {' '.join(args)} failed ({code}):\n{err.getvalue()}"
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory) -> Path:
    return qwen_style_model(tmp_path_factory.mktemp("models") / "qwen-style")


@pytest.mark.parametrize("recipe", ["chat", "chat-lora"])
def test_chat_recipe_takes_a_model_of_another_family(recipe, qwen_model, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    home = tmp_path / "home"
    monkeypatch.delenv("RLHF_NO_PROGRESS", raising=False)
    _, log = rlhf(home, "pipeline", "run", f"configs/{recipe}/pipeline.yaml",
                  f"start={qwen_model}", *SHORT)
    # Every long phase shows its progress (as lines: stderr is not a terminal), not only the
    # training steps.
    for phase in ("sft: eval loss", "gold eval", "reward: score held-out answers",
                  "reward: sample answers to normalize", "reward: score answers to normalize",
                  "gold eval (sampled)", "ppo"):
        assert re.search(rf"^{re.escape(phase)}: (\d+)/\1 \w+ \(100%\)", log, re.M), phase
    monkeypatch.setenv("RLHF_NO_PROGRESS", "1")
    registry = Registry(home)
    sft, reward, ppo = (registry.lookup(f"{stage}:latest") for stage in ("sft", "reward", "ppo"))
    assert sft.parents == {"model": str(qwen_model)}
    # With LoRA, SFT publishes its adapter; PPO trains one on the merged SFT model and merges it.
    assert (Path(sft.model_path) / "adapter_config.json").is_file() == (recipe == "chat-lora")
    assert not (Path(ppo.model_path) / "adapter_config.json").is_file()
    assert ppo.parents == {"policy": sft.id, "reward": reward.id}
    assert AutoConfig.from_pretrained(reward.model_path).architectures == \
        ["Qwen2ForSequenceClassification"]
    # The model's own template and EOS were kept: nothing of this project's framing was added.
    tokenizer = AutoTokenizer.from_pretrained(ppo.model_path)
    assert tokenizer.chat_template == QWEN_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    assert "<|assistant|>" not in tokenizer.get_vocab()

    chat, _ = rlhf(home, "chat", "ppo:latest", "--temperature", "0", "--max-new-tokens", "8",
                "--reward", "reward:latest", stdin=f"{QUESTION}\n/exit\n")
    assert chat.count("assistant> ") == 1 and "(reward " in chat
    scored, _ = rlhf(home, "score", "reward:latest", "--prompt", QUESTION,
                  "--response", "Three chickens have 6 legs.", "--response", "7.")
    assert "Three chickens have 6 legs." in scored

    exported = tmp_path / "exported"
    rlhf(home, "export", "sft:latest", str(exported), "--merge")
    model = AutoModelForCausalLM.from_pretrained(exported)  # plain transformers, no adapter
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())
