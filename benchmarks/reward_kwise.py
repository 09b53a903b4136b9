"""Benchmark: the reward stage's K-wise ranking loss against TRL's RewardTrainer on pairs.

    python benchmarks/reward_kwise.py [--data both|world|long] [--model sft:latest] [--home runs]
                                      [--epochs 0.5] [--long-prompts 512] [--threads 2]

Two data sets, each raced side by side in one run:
- world: the embedded world's reward_train.jsonl / reward_eval.jsonl (K = 4 answers per prompt,
  short single-turn prompts);
- long: multi-turn dialogues built here from the same rows: earlier turns (the world's
  demonstrations) in front of each question until the prompt is close to 200 tokens, and closing
  sentences shared by a prompt's K answers until the longest answer is close to 50 tokens; the
  ranking is the world row's.
Both trainers start from the same model (the same new score head too) with the same seed, passes
over the data, optimizer steps, learning-rate schedule and token sequences:
- this stage: one example is one prompt with its K answers, packed into one row so the prompt is
  computed once, each answer scored once per step; the loss covers all K·(K−1)/2 pairs of the
  prompt (InstructGPT);
- TRL 1.16 `RewardTrainer`, which takes pairs only: the pairwise expansion, every strictly ordered
  pair of a prompt as a separate (chosen, rejected) example, so an answer is scored once per pair
  it belongs to (K − 1 times), each time with its prompt. Its batch holds the pairs of as many
  prompts as ours, so both take the same number of optimizer steps.
Prints the wall time of both training loops, their ratio, and the held-out pairwise accuracy of
both, measured by the same code. Model loading, tokenization and evaluation are outside the timed
part for both. Times depend on what else the machine runs; run it on an idle machine for numbers
worth quoting.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the path set-up, so the project imports from this checkout)

from pipeline.config import load_config  # noqa: E402
from pipeline.data.packing import shared_prefix_length  # noqa: E402
from pipeline.registry import Registry, Resolved  # noqa: E402
from pipeline.reward_model import (build_reward_model, choose_shared_prompt,  # noqa: E402
                                   load_reward_model, reward_tokenizer)
from pipeline.tokenizer import encode_prompt, encode_prompt_response  # noqa: E402
from pipeline.world.cache import train_and_eval_files, world_file  # noqa: E402
from stages.reward import (Config, RankedSet, held_out_metrics, load_splits, run,  # noqa: E402
                           score_batch_size)

LONG_PROMPT_TOKENS = 200  # at most, and the longest answer at most LONG_ANSWER_TOKENS
LONG_ANSWER_TOKENS = 50


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["both", "world", "long"], default="both")
    parser.add_argument("--model", default="sft:latest", help="starting checkpoint (ref or dir)")
    parser.add_argument("--home", help="registry home holding --model (default: $RLHF_HOME or ./runs)")
    parser.add_argument("--config", default=str(ROOT / "configs/tiny/reward.yaml"),
                        help="reward config giving lr, schedule, max_length and the world")
    parser.add_argument("--epochs", type=float, default=0.5, help="passes over the train prompts")
    parser.add_argument("--batch-prompts", type=int, help="prompts per optimizer step (default: "
                        "the config's train.batch_size)")
    parser.add_argument("--long-prompts", type=int, default=512,
                        help="train prompts of the long data set (held out: a quarter as many)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for both")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = Registry(args.home)
    parent_path = registry.resolve(args.model).verified_path()
    tokenizer = reward_tokenizer(parent_path)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in (["world", "long"] if args.data == "both" else [args.data]):
            config = load_config(Config, args.config, [
                f"model.source={parent_path}", "train.eval_every=0",
                "normalize.answers=best_ranked"])
            config.train.batch_size = args.batch_prompts or config.train.batch_size
            train_files, eval_files = train_and_eval_files(registry, config.data, "reward")
            if name == "long":
                train_files, eval_files = write_long_prompt_data(
                    registry, config, tokenizer, Path(scratch), args.long_prompts)
            config.data.train_files, config.data.eval_files = train_files, eval_files
            results.append((name, race(config, parent_path, tokenizer, args)))
    print(f"\n{'data':<8}{'this stage (s)':>16}{'TRL pairs (s)':>15}{'speed-up':>10}"
          f"{'held-out acc: ours':>20}{'TRL':>8}")
    for name, (ours, trl) in results:
        print(f"{name:<8}{ours[0]:>16.1f}{trl[0]:>15.1f}{trl[0] / ours[0]:>9.2f}x"
              f"{ours[1]:>20.4f}{trl[1]:>8.4f}")
    return 0


def race(config: Config, parent_path: str, tokenizer,
         args: argparse.Namespace) -> tuple[tuple[float, float], tuple[float, float]]:
    """Both trainers on one data set: ((seconds, held-out accuracy) of ours, the same of TRL)."""
    train_set, eval_set = load_splits(tokenizer, config.data.train_files, config.data.eval_files,
                                      config)
    steps = math.ceil(args.epochs * len(train_set.rows) / config.train.batch_size)
    config.train.max_steps = steps
    config.checkpoint.every_steps = steps  # no resume states: they are not part of the race
    n_pairs = sum(len(pairs_of(row["ranks"])) for row in train_set.rows)
    prompt, answer = mean_shared_and_own_tokens(train_set)
    print(f"\ndata: {len(train_set.rows)} train prompts ({n_pairs} ordered pairs), "
          f"{len(eval_set.rows)} eval prompts; on average {prompt:.0f} prompt tokens and "
          f"{answer:.0f} answer tokens; {args.epochs} passes = {steps} optimizer steps of "
          f"{config.train.batch_size} prompts; lr {config.train.lr}, seed {config.seed}, "
          f"{args.threads} threads", flush=True)
    ours = train_kwise(config, eval_set)
    print(f"K-wise (this stage) done in {ours[0]:.1f} s", flush=True)
    trl = train_trl_pairs(config, parent_path, tokenizer, train_set, eval_set, args.epochs)
    print(f"TRL RewardTrainer done in {trl[0]:.1f} s", flush=True)
    return ours, trl


def mean_shared_and_own_tokens(ranked: RankedSet) -> tuple[float, float]:
    """Mean tokens a prompt's answers share (the prompt) and mean tokens of an answer's own."""
    shared = [shared_prefix_length(seqs) for seqs in ranked.sequences]
    own = [len(seq) - prefix for seqs, prefix in zip(ranked.sequences, shared) for seq in seqs]
    return sum(shared) / len(shared), sum(own) / len(own)


def pairs_of(ranks: list[int]) -> list[tuple[int, int]]:
    """(winner, loser) answer indices of every strictly ordered pair; ties form no pair."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def write_long_prompt_data(registry: Registry, config: Config, tokenizer, directory: Path,
                           n_train: int) -> tuple[list[str], list[str]]:
    """The long data set (see the module docstring) as ranked JSONL files: (train, eval) lists."""
    rng = random.Random(config.seed)
    demonstrations = [row["messages"] for row in world_rows(registry, config, "sft_train.jsonl")]
    rows = world_rows(registry, config, "reward_train.jsonl")
    rng.shuffle(rows)
    files = []
    for split, chosen in (("train", rows[:n_train]), ("eval", rows[n_train:n_train + n_train // 4])):
        path = directory / f"long_{split}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for row in chosen:
                out.write(json.dumps(long_row(row, demonstrations, tokenizer, rng),
                                     ensure_ascii=False) + "\n")
        files.append([str(path)])
    return files[0], files[1]


def world_rows(registry: Registry, config: Config, name: str) -> list[dict]:
    path = world_file(registry, config.data.world, name)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def long_row(row: dict, demonstrations: list[list[dict]], tokenizer, rng: random.Random) -> dict:
    """A world ranked row as a multi-turn dialogue: earlier turns before its question while the
    prompt stays within LONG_PROMPT_TOKENS, and closing sentences (demonstrations' answers, the same
    for all K) after its answers while the longest stays within LONG_ANSWER_TOKENS; together they
    fit the tiny model's 256-token context, so no answer is cut (a cut answer shares no prompt)."""
    def prompt_tokens(messages: list[dict]) -> int:
        return len(encode_prompt(tokenizer, messages, 10**6))

    def answer_tokens(messages: list[dict], responses: list[str]) -> int:
        return max(len(encode_prompt_response(tokenizer, messages, response, 10**6))
                   for response in responses) - prompt_tokens(messages)

    prompt = [{"role": "user", "content": row["prompt"]}]
    responses = list(row["responses"])
    for _ in range(40):  # tries: a turn or a closing that would overshoot is skipped
        if (prompt_tokens(prompt) > LONG_PROMPT_TOKENS - 20
                and answer_tokens(prompt, responses) > LONG_ANSWER_TOKENS - 10):
            break
        longer_prompt = rng.choice(demonstrations) + prompt
        if prompt_tokens(longer_prompt) <= LONG_PROMPT_TOKENS:
            prompt = longer_prompt
        closing = rng.choice(demonstrations)[-1]["content"]
        longer_answers = [f"{response} {closing}" for response in responses]
        if answer_tokens(prompt, longer_answers) <= LONG_ANSWER_TOKENS:
            responses = longer_answers
    return {"prompt": prompt, "responses": responses, "ranking": row["ranking"]}


def train_kwise(config: Config, eval_set: RankedSet) -> tuple[float, float]:
    """Run the reward stage in a scratch registry; time = the sum of its logged step times."""
    with tempfile.TemporaryDirectory() as home:
        registry = Registry(home)
        finished = run(config, registry, restart=True)
        seconds = sum(value for _, value in registry.metrics(finished.id)["step_time"])
        model, _ = load_reward_model(Resolved(finished.model_path))
        accuracy = evaluate(model, eval_set, config)
    return seconds, accuracy


def evaluate(model, eval_set: RankedSet, config: Config) -> float:
    """Held-out pairwise accuracy, scored the same way for both models."""
    shared, _ = choose_shared_prompt(model, eval_set.sequences)
    metrics = held_out_metrics(model, eval_set, score_batch_size(config), 0.0, shared)
    return metrics["pairwise_accuracy"]


def train_trl_pairs(config: Config, parent_path: str, tokenizer, train_set: RankedSet,
                    eval_set: RankedSet, epochs: float) -> tuple[float, float]:
    """TRL's RewardTrainer on the pairwise expansion of the same encoded answers."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    pairs = [{"chosen_ids": seqs[winner], "rejected_ids": seqs[loser]}
             for seqs, row in zip(train_set.sequences, train_set.rows)
             for winner, loser in pairs_of(row["ranks"])]
    model = build_reward_model(Resolved(parent_path), tokenizer, config.seed)
    train = config.train
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = RewardTrainer(
            model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(pairs),
            args=RewardConfig(
                output_dir=output_dir, seed=config.seed, num_train_epochs=epochs,
                # As many prompts' pairs per step as this stage's batch: equal step counts.
                per_device_train_batch_size=train.batch_size * len(pairs) // len(train_set.rows),
                learning_rate=train.lr, warmup_steps=train.warmup_steps,
                lr_scheduler_type="cosine_with_min_lr",
                lr_scheduler_kwargs={"min_lr_rate": train.min_lr_ratio},
                weight_decay=train.weight_decay, adam_beta2=0.95, max_grad_norm=train.max_grad_norm,
                max_length=None, use_cpu=True, bf16=False, gradient_checkpointing=False,
                report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return seconds, evaluate(model.eval(), eval_set, config)


if __name__ == "__main__":
    sys.exit(main())
