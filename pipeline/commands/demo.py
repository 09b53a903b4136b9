"""`make demo`: the whole tiny pipeline on the embedded world, then its report card, the gold score
after each stage, and two questions put to the final model.

    python -m pipeline.commands.demo [sft.train.max_steps=50 ...]   (home: ./runs or $RLHF_HOME)

It runs the tiny preset (`configs/tiny/pipeline.yaml`) exactly as `rlhf pipeline run tiny` does,
so running it again reuses every finished stage, and an interrupted demo continues where it
stopped.
"""

from __future__ import annotations

import sys
import time

from pipeline import console
from pipeline.commands.chain import execute, plan_from_yaml
from pipeline.commands.report import number_text, write_report
from pipeline.errors import run_command
from pipeline.generation import Conversation, SamplingConfig, load_for_sampling
from pipeline.registry import Registry, resolve_model

PIPELINE_YAML = "tiny"
CONVERSATION = ("How many legs do three chickens have?", "What sound does a cow make?")
# What each `reward.data.answers` choice is, in the demo's words. configs/tiny/reward.yaml ships
# the one whose final policy scored higher on held-out gold, and says by how much.
REWARD_DATA = {
    "template": "the world's template answers, ranked by the labeler",
    "policy": "the SFT policy's own answers, sampled and ranked by the world's labeler",
    "both": "the world's template answers and the SFT policy's own answers, ranked by the labeler",
}


def main(argv: list[str] | None = None) -> int:
    console.setup(None)  # `make demo > log`: progress as lines, as `rlhf` writes it
    return run_command(lambda: demo(sys.argv[1:] if argv is None else argv),
                       interrupted="interrupted; run `make demo` again to continue where it stopped")


def demo(overrides: list[str]) -> int:
    started = time.time()
    plan = plan_from_yaml(PIPELINE_YAML, overrides)
    answers = plan.configs["reward"].data.answers
    print(f"reward data: {REWARD_DATA[answers]} (reward.data.answers={answers}; "
          f"configs/tiny/reward.yaml says why it is the default)", flush=True)
    registry = Registry()
    pipeline = execute(plan, registry)
    trained = time.time() - started
    report = write_report(registry, pipeline, registry.home / "reports" / pipeline.id)

    print(f"\npipeline {pipeline.id}: {trained:.0f} s of training, "
          f"{time.time() - started:.0f} s with the report")
    print(f"report: {report.markdown}\n        {report.html}")
    print("\ngold score after each stage (greedy answers to held-out prompts, 0 to 1):")
    for name, gold in report.data.get("gold", {}).items():
        print(f"  {name:<9} {number_text(gold['mean_gold_score'])}   count accuracy "
              f"{number_text(gold['count_accuracy'])}   format adherence "
              f"{number_text(gold['format_adherence'])}")

    # The world's demonstrations are single turns: a tiny model lost after one turn of history
    # ("Of course!" and nothing more), so each question starts a new chat.
    print(f"\nchats with the final model ({pipeline.summary['final_run']}), one question each:")
    model, tokenizer = load_for_sampling(resolve_model(registry, pipeline.id))
    conversation = Conversation(model, tokenizer, SamplingConfig(max_new_tokens=96, temperature=0))
    for question in CONVERSATION:
        conversation.reset()
        print(f"  you> {question}")
        print(f"  assistant> {conversation.reply(question)}")
    print(f"\ntalk to it yourself: .venv/bin/rlhf chat {pipeline.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
