"""End to end: `rlhf chat` driven through stdin (answers come out, /reset starts over, /exit quits,
--reward scores each answer), the conversation's history, and `rlhf generate` for scripts; all on
the tiny pipeline's final model (`shared_pipeline`)."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT, cli_env, rlhf, rlhf_command
from test_pipeline import shared_pipeline

pytestmark = pytest.mark.e2e

QUESTION = "How many legs do three chickens have?"


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    return shared_pipeline(tmp_path_factory)


def chat(home, *args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(rlhf_command(home, "chat", *args), cwd=ROOT, env=cli_env(), input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_chat_through_stdin(outcome):
    pipeline = outcome.third_run["run"]  # a pipeline reference means its final model
    messages = [QUESTION, "What sound does a cow make?", "/reset", QUESTION, "/exit", "unread"]
    result = chat(outcome.home, pipeline, "--temperature", "0", "--max-new-tokens", "16",
                  "--reward", "reward:latest", stdin="".join(f"{m}\n" for m in messages))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    answers = [line[len("assistant> "):] for line in lines if line.startswith("assistant> ")]
    rewards = [line for line in lines if line.startswith("  (reward ")]
    assert len(answers) == 3 and len(rewards) == 3
    assert "(new conversation)" in lines
    # After /reset the same question meets the same empty history: greedy gives the same answer.
    assert answers[2] == answers[0]
    assert f"you> {QUESTION}" in lines and "you> unread" not in lines  # /exit stopped reading


def test_conversation_keeps_its_history_until_reset(outcome, monkeypatch):
    import pipeline.generation as generation
    from pipeline.registry import Registry

    prompts = []
    encode = generation.encode_prompt
    monkeypatch.setattr(generation, "encode_prompt",
                        lambda tokenizer, messages, limit: prompts.append(messages) or
                        encode(tokenizer, messages, limit))
    registry = Registry(outcome.home, create=False)
    model, tokenizer = generation.load_for_sampling(registry.resolve(outcome.third_run["run"]))
    conversation = generation.Conversation(model, tokenizer,
                                            generation.SamplingConfig(max_new_tokens=8, temperature=0))
    first = conversation.reply(QUESTION)
    conversation.reply("And two cows?")
    assert [m["role"] for m in prompts[1]] == ["user", "assistant", "user"]
    assert prompts[1][1]["content"] == first
    conversation.reset()
    assert conversation.reply(QUESTION) == first and len(prompts[2]) == 1


def test_generate_for_scripts(outcome):
    args = ("generate", "ppo:latest", "--prompt", QUESTION, "--n", "3", "--temperature", "1.0",
            "--max-new-tokens", "12", "--seed", "3", "--json")
    first = json.loads(rlhf(outcome.home, *args).stdout)
    assert first["prompt"] == QUESTION and len(first["answers"]) == 3
    assert json.loads(rlhf(outcome.home, *args).stdout) == first  # seeded: the same answers


def test_chat_refuses_a_reward_model(outcome):
    result = chat(outcome.home, "reward:latest", stdin="hello\n")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "is a reward model" in result.stderr
    assert len(result.stderr.splitlines()) == 1
