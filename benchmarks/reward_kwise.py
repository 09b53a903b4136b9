"""Benchmark: the reward stage's K-wise ranking loss against TRL's RewardTrainer on pairs.

    python benchmarks/reward_kwise.py [--model sft:latest] [--home runs] [--epochs 1]
                                      [--batch-prompts N] [--threads 2]

Both train the same starting model (the same new score head too) on the same ranked data (the
embedded world's reward_train.jsonl, K = 4 answers per prompt), with the same seed, passes over the
data, optimizer steps, learning-rate schedule and token sequences:
- this stage: one example is one prompt with its K answers, each answer scored once per step, and
  the loss covers all K·(K−1)/2 pairs of the prompt (InstructGPT);
- TRL 1.16 `RewardTrainer`, which takes pairs only: the pairwise expansion, every strictly ordered
  pair of a prompt as a separate (chosen, rejected) example, so an answer is scored once per pair
  it belongs to (K − 1 times). Its batch holds the pairs of as many prompts as ours, so both take
  the same number of optimizer steps.
Prints the wall time of both training loops, their ratio, and the held-out pairwise accuracy of
both on reward_eval.jsonl, measured by the same code. Model loading, tokenization and evaluation
are outside the timed part for both. Times depend on what else the machine runs; run it on an idle
machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the path set-up, so the project imports from this checkout)

from pipeline.config import load_config  # noqa: E402
from pipeline.registry import Registry, Resolved  # noqa: E402
from pipeline.reward_model import (build_reward_model, load_reward_model,  # noqa: E402
                                   reward_tokenizer)
from pipeline.world.cache import train_and_eval_files  # noqa: E402
from stages.reward import (Config, RankedSet, held_out_metrics, load_splits, run,  # noqa: E402
                           score_batch_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sft:latest", help="starting checkpoint (ref or dir)")
    parser.add_argument("--home", help="registry home holding --model (default: $RLHF_HOME or ./runs)")
    parser.add_argument("--config", default=str(ROOT / "configs/tiny/reward.yaml"),
                        help="reward config giving lr, schedule, max_length and the world")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the train prompts")
    parser.add_argument("--batch-prompts", type=int, help="prompts per optimizer step (default: "
                        "the config's train.batch_size)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for both")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = Registry(args.home)
    parent_path = registry.resolve(args.model).verified_path()
    config = load_config(Config, args.config, [
        f"model.source={parent_path}", "train.eval_every=0", "normalize.answers=best_ranked"])
    config.train.batch_size = args.batch_prompts or config.train.batch_size
    config.data.train_files, config.data.eval_files = train_and_eval_files(
        registry, config.data, "reward")
    tokenizer = reward_tokenizer(parent_path)
    train_set, eval_set = load_splits(tokenizer, config.data.train_files, config.data.eval_files,
                                      config)
    steps = math.ceil(args.epochs * len(train_set.rows) / config.train.batch_size)
    config.train.max_steps = steps
    config.checkpoint.every_steps = steps  # no resume states: they are not part of the race
    n_pairs = sum(len(pairs_of(row["ranks"])) for row in train_set.rows)
    print(f"data: {len(train_set.rows)} train prompts ({n_pairs} ordered pairs), "
          f"{len(eval_set.rows)} eval prompts; {args.epochs} passes = {steps} optimizer steps of "
          f"{config.train.batch_size} prompts; lr {config.train.lr}, seed {config.seed}, "
          f"{args.threads} threads", flush=True)

    kwise_seconds, kwise_accuracy = train_kwise(config, eval_set)
    print(f"K-wise (this stage) done in {kwise_seconds:.1f} s", flush=True)
    trl_seconds, trl_accuracy = train_trl_pairs(config, parent_path, tokenizer, train_set,
                                                eval_set, args.epochs)
    print(f"\n{'':<34}{'train wall (s)':>15}{'held-out pairwise acc':>24}")
    print(f"{'K-wise loss (this stage)':<34}{kwise_seconds:>15.1f}{kwise_accuracy:>24.4f}")
    print(f"{'TRL RewardTrainer, pair expansion':<34}{trl_seconds:>15.1f}{trl_accuracy:>24.4f}")
    print(f"speed-up: {trl_seconds / kwise_seconds:.2f}x; accuracy difference "
          f"{kwise_accuracy - trl_accuracy:+.4f}")
    return 0


def pairs_of(ranks: list[int]) -> list[tuple[int, int]]:
    """(winner, loser) answer indices of every strictly ordered pair; ties form no pair."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def train_kwise(config: Config, eval_set: RankedSet) -> tuple[float, float]:
    """Run the reward stage in a scratch registry; time = the sum of its logged step times."""
    with tempfile.TemporaryDirectory() as home:
        registry = Registry(home)
        finished = run(config, registry, restart=True)
        seconds = sum(value for _, value in registry.metrics(finished.id)["step_time"])
        model, _ = load_reward_model(Resolved(finished.model_path))
        accuracy = held_out_metrics(model, eval_set, score_batch_size(config), shift=0.0)
    return seconds, accuracy["pairwise_accuracy"]


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
    accuracy = held_out_metrics(model.eval(), eval_set, score_batch_size(config), shift=0.0)
    return seconds, accuracy["pairwise_accuracy"]


if __name__ == "__main__":
    sys.exit(main())
