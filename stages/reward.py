"""Reward stage: train a reward model on prompts with K ranked answers, as InstructGPT did.

    rlhf run reward --config configs/tiny/reward.yaml [model.source=sft:latest loss.margin=0.5 ...]

Reads top to bottom: the starting checkpoint (`model.source`, default `sft:latest`) and its
tokenizer → load and encode the ranked answers, all before anything is registered, so bad data
leaves no trace → a one-label sequence classifier with the parent's backbone and a new score head
(optionally LoRA) → train with the shared loop on the K-wise ranking loss → normalize → held-out
metrics → publish a plain Hugging Face directory plus `reward_model.json`.
Re-running the same command after an interruption resumes from the last committed state.

One example is one prompt with its K answers, each answer scored once per step (not once per
pair side, as the K·(K−1) sequences of a pairwise expansion would). A micro-batch packs each prompt
and its K answers into one block, short blocks sharing a row
(`pipeline.data.packing.pack_shared_prompts`): the prompt's tokens are computed once, and a block
attention mask with per-answer position ids gives every answer the score it has as its own
sequence. Only the real tokens go through the model; attention alone sees the rows
(`pipeline.packed`). A model whose attention takes no such mask gets the answers as
separate right-padded sequences instead, and the stage says so. Then
`pipeline.ranking.kwise_ranking_loss` forms every strictly ordered pair of a prompt from the scores.
Pairwise data is the K = 2 case.

Normalization (InstructGPT §3.5): after training, the score head gets the bias that makes the SFT
answers score 0 on average. `normalize.answers: sft_samples` samples the parent (the SFT policy
PPO starts from) on eval prompts with PPO's settings and scores them as PPO will, so PPO starts
near reward 0; `best_ranked` uses the best-ranked answers of the eval rankings as a stand-in for
demonstrations. The shift is stored in the run summary and in `reward_model.json`; see
`pipeline.reward_model` for why plain transformers cannot apply it.

Step 2 of the recipe ranks the policy's own answers: with `data.answers: policy` (or `both`, next
to the template answers of the train files) the stage first samples K answers per train prompt from
its parent, has the world's gold labeler rank them (`policy_answers`), and trains on those. The
collected file is cached in the registry home by parent and settings, and its provenance (file,
fingerprint, policy, counts, labeler agreement) goes into the run summary.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from pipeline.config import (HeldOutHubDataSection, LoraConfig, ModelDtypeSection, Section,
                             StageConfig)
from pipeline.data.collect import (cached_collection, check_request, collect, describe,
                                   read_provenance)
from pipeline.data.fingerprint import data_fingerprint, fingerprint_files
from pipeline.data.formats import load_ranked_rows
from pipeline.data.prompts import read_chat_prompts
from pipeline.data.packing import pack_shared_prompts, right_pad
from pipeline.errors import UserError
from pipeline.generation import Answer, SamplingConfig, sample_answers
from pipeline.loop import fit, micro_batch_indices
from pipeline.guard import check_chat_model, require_causal_lm
from pipeline.labelers import make_labeler
from pipeline.models import (apply_lora, count_parameters, empty_model, load_causal_lm,
                             merge_adapter)
from pipeline.ranking import encode_groups, kwise_ranking_loss, ranking_metrics
from pipeline.registry import Registry, Resolved, Run
from pipeline.reward_model import (MARKER_KIND, REWARD_MARKER, build_reward_model,
                                   choose_shared_prompt, encode_ranked_row,
                                   packed_scores, reward_tokenizer, score_groups,
                                   score_sequences, sequence_scores)
from pipeline.runtime import StageRun, stage_precision
from pipeline.sharding import check_layers
from pipeline.tokenizer import load_tokenizer
from pipeline.world.cache import WorldSection, train_and_eval_files, world_file


class ModelSection(ModelDtypeSection):
    source: str = Field("sft:latest", description="the checkpoint to start from: a registry "
                        "reference (run id, STAGE:latest, alias), a local HF directory or a hub name")


class DataSection(HeldOutHubDataSection):
    train_files: list[str] = Field(default_factory=list, description="ranked-answer files, "
                                   "directories or a hub data set; empty = the embedded world's "
                                   "reward_train.jsonl")
    eval_files: list[str] = Field(default_factory=list, description="held-out rankings; empty = the "
                                  "world's reward_eval.jsonl, or eval_fraction of train_files when "
                                  "those are given")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="share of train_files prompts held "
                                 "out when eval_files is empty")
    format: Literal["auto", "ranked", "scored", "pairwise", "transcripts",
                    "ultrafeedback"] = Field(
        "auto", description="row format; auto detects it from the first row's columns")
    columns: dict[str, str] = Field(default_factory=dict, description="our column name → yours, "
                                    "e.g. {chosen: better, rejected: worse}")
    world: WorldSection = Field(default_factory=WorldSection)
    answers: Literal["template", "policy", "both"] = Field(
        "template", description="what the train rankings rank: the answers of train_files (the "
        "world's template answers by default), the parent policy's own answers sampled and "
        "labeled first (see policy_answers), or both")
    max_length: int = Field(256, ge=8, description="tokens per prompt + answer")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="a longer prompt + answer: keep its last max_length tokens (the "
                                "EOS stays), or drop the whole prompt; both are counted and reported")


class LossSection(Section):
    margin: float = Field(0.0, ge=0, description="required score gap: −log σ(r_w − r_l − margin)")
    center_coef: float = Field(0.0, ge=0, description="weight of mean(score²), keeping scores near 0")


class NormalizeSection(Section):
    """With `sft_samples`, set the sampling fields to the PPO stage's (its `generation` section and
    `data.max_prompt_tokens`): the answers are then scored exactly as PPO will score them."""

    answers: Literal["sft_samples", "best_ranked"] = Field(
        "sft_samples", description="answers that score 0 on average after training: samples of the "
        "parent model on eval prompts, or the best-ranked eval answers")
    prompts: int = Field(64, ge=1, description="eval prompts sampled (sft_samples)")
    max_prompt_tokens: int = Field(96, ge=1, description="prompt tokens kept, chat framing "
                                   "included (sft_samples; PPO's data.max_prompt_tokens)")
    max_new_tokens: int = Field(64, ge=1, description="answer length limit (sft_samples)")
    temperature: float = Field(0.7, ge=0, description="sampling temperature, 0 = greedy (sft_samples)")
    top_k: int = Field(0, ge=0, description="0 = no top-k filtering (sft_samples)")
    top_p: float = Field(1.0, gt=0, le=1, description="1 = no nucleus filtering (sft_samples)")


class PolicyAnswersSection(Section):
    """The parent's own answers as reward data (data.answers policy or both): K answers per train
    prompt, sampled with the `normalize` section's settings (PPO's), ranked by the world's gold
    labeler. Collected once per parent and settings into the registry home's data cache."""

    prompts_file: str | None = Field(None, description="JSONL of train prompts; empty = the "
                                     "world's reward_train.jsonl")
    prompts: int = Field(1000, ge=1, description="the first N prompts of the file")
    k: int = Field(4, ge=2, description="answers sampled per prompt")
    labeler: Literal["gold"] = Field("gold", description="who ranks them: the world's simulated "
                                     "labeler (people rank with `rlhf data collect` and "
                                     "`rlhf label`)")
    labeler_temperature: float = Field(0.0, ge=0, description="Plackett-Luce temperature of the "
                                       "labeler's disagreement; 0 = the gold order")


class Config(StageConfig):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    policy_answers: PolicyAnswersSection = Field(default_factory=PolicyAnswersSection)
    loss: LossSection = Field(default_factory=LossSection)
    normalize: NormalizeSection = Field(default_factory=NormalizeSection)
    lora: LoraConfig = Field(default_factory=LoraConfig)


@dataclass
class RankedSet:
    """One split's prompts with their encoded answers, and what happened to over-long ones."""

    rows: list[dict] = field(default_factory=list)  # {"prompt", "responses", "ranks", "_line"}
    sequences: list[list[list[int]]] = field(default_factory=list)  # [prompt][answer] → ids, EOS last
    read: int = 0        # prompts read
    truncated: int = 0   # answers cut to max_length, kept
    dropped: int = 0     # prompts left out (truncation=drop)

    def report(self, name: str) -> dict[str, int]:
        return {f"{name}_prompts": len(self.rows), f"{name}_answers_truncated": self.truncated,
                f"{name}_prompts_dropped": self.dropped}

    def describe(self, name: str, data: DataSection) -> str:
        answers = sum(len(seqs) for seqs in self.sequences)
        return (f"{name} {len(self.rows)} of {self.read} prompts, {answers} answers "
                f"({self.truncated} answers cut to their last {data.max_length} tokens, "
                f"{self.dropped} prompts dropped)")


def run(config: Config, registry: Registry, *, restart: bool = False,
        pipeline_id: str | None = None, parents: dict[str, Resolved] | None = None) -> Run:
    stage_precision(config)  # refuses a dtype this device cannot train in, before any write
    if parents is None:
        parents = {"model": registry.resolve(config.model.source)}
    trust = config.runtime.trust_remote_code
    source = require_causal_lm(parents["model"], "model.source", trust)
    tokenizer = reward_tokenizer(source, trust_remote_code=trust, revision=parents["model"].revision)
    check_chat_model(source, tokenizer, "model.source", config.data.max_length)
    check_layers(config.runtime, "model.source", lambda: empty_model(source, trust_remote_code=trust))
    train_files, eval_files = train_and_eval_files(registry, config.data, "reward")
    collected = []
    if config.data.answers != "template":
        collected = [policy_answers_file(registry, config, policy)
                     for policy in answer_sources(parents)]
        train_files = [*(train_files if config.data.answers == "both" else []),
                       *map(str, collected)]
    train_set, eval_set = load_splits(tokenizer, train_files, eval_files, config)
    stage_run = StageRun.open("reward", config, registry, parents=parents,
                              data_fingerprint=data_fingerprint(train_files, eval_files, None),
                              restart=restart, pipeline_id=pipeline_id)
    if stage_run.reused:
        return stage_run.run
    with stage_run:
        return _train(stage_run, config, tokenizer, train_set, eval_set, parents["model"],
                      ppo_policy=answer_sources(parents)[-1],
                      policy_answers=[{"file": str(path), **read_provenance(path)}
                                      for path in collected])


def _train(stage_run, config: Config, tokenizer, train_set: RankedSet, eval_set: RankedSet,
           parent: Resolved, ppo_policy: Resolved, policy_answers: list[dict]) -> Run:
    """`parent` initializes the model; `ppo_policy` (the policy PPO will start from: the parent,
    or in a later round the last round's PPO policy) gives the answers normalized to 0."""
    stage_run.say(f"reward: {train_set.describe('train', config.data)}; "
                  f"{eval_set.describe('eval', config.data)}")
    model = _reward_model(stage_run, config, tokenizer, parent)
    stage_run.say(f"reward: {count_parameters(model, trainable_only=True):,} trainable of "
                  f"{count_parameters(model):,} parameters{' (LoRA)' if config.lora.enabled else ''}")
    pad_id = tokenizer.pad_token_id
    shared, how = choose_shared_prompt(model, train_set.sequences)
    stage_run.say(f"reward: {how}")

    def batches_for_step(step: int):
        return [(idx, collate_rankings([train_set.sequences[i] for i in idx],
                                       [train_set.rows[i]["ranks"] for i in idx], pad_id, shared))
                for idx in micro_batch_indices(stage_run, len(train_set.rows), step)]

    def loss_fn(model, batch: dict):
        return ranking_loss(model, batch, config.loss)

    final_scores: list[list[float]] = []  # the last eval's raw held-out scores, for the summary

    def eval_fn(model) -> dict:
        final_scores[:] = held_out_scores(model, eval_set, score_batch_size(config), shared)
        return flat_metrics(scores_metrics(final_scores, eval_set, shift=0.0), scale_free=True)

    fit(stage_run, model, tokenizer, batches_for_step=batches_for_step, loss_fn=loss_fn,
        eval_fn=eval_fn, tokens_in=lambda batch: int(batch["attention_mask"].sum()), desc="reward")

    reward_model = merge_adapter(model)  # LoRA folded in: the published model is a plain classifier
    normalization = normalization_shift(reward_model, eval_set, config, ppo_policy)
    # The final eval scored the held-out answers already (with LoRA, before the merge, which
    # changes no score beyond rounding): the shift only moves them.
    metrics = scores_metrics(final_scores, eval_set, shift=normalization["shift"])
    stage_run.log(config.train.max_steps, flat_metrics(metrics, scale_free=False))
    stage_run.say(describe_metrics(metrics, normalization))
    summary = {**metrics, "shift": normalization["shift"], "normalization": normalization,
               **train_set.report("train"), **eval_set.report("eval"),
               "lora": config.lora.enabled, "policy_answers": policy_answers}
    marker = reward_marker(metrics, normalization, config)
    stage_run.publish(reward_model, tokenizer, summary=summary,
                      extra_writer=lambda directory: write_marker(directory, marker))
    return stage_run.registry.get(stage_run.run.id)


def _reward_model(stage_run, config: Config, tokenizer, parent: Resolved):
    """The model to train: fresh from the parent (plus a new LoRA adapter), or the resume state's."""
    from transformers import AutoModelForSequenceClassification


    trust = config.runtime.trust_remote_code
    dtype = stage_precision(config).weights
    resume_dir = stage_run.state_model_dir()
    if resume_dir is not None and not config.lora.enabled:
        return AutoModelForSequenceClassification.from_pretrained(
            resume_dir, trust_remote_code=trust, dtype=dtype)
    model = build_reward_model(parent, tokenizer, config.seed, trust_remote_code=trust,
                               dtype=dtype)
    if resume_dir is not None:
        from peft import PeftModel
        return PeftModel.from_pretrained(model, resume_dir, is_trainable=True)
    # SEQ_CLS makes peft train and save the new score head in full (modules_to_save).
    return apply_lora(model, config.lora, task_type="SEQ_CLS")


# -- data ---------------------------------------------------------------------------------------
def answer_sources(parents: dict[str, Resolved]) -> list[Resolved]:
    """The policies whose answers are collected: the parent, then the `answers_from_K` parents
    (the PPO policy of each earlier round, when a pipeline runs several)."""
    later = sorted((role for role in parents if role.startswith("answers_from_")),
                   key=lambda role: int(role.rpartition("_")[2]))
    return [parents["model"], *(parents[role] for role in later)]


def policy_answers_file(registry: Registry, config: Config, policy: Resolved) -> Path:
    """The policy's answers to the train prompts, ranked (`pipeline.data.collect`): sampled the
    first time, then read from the registry home's data cache."""
    section = config.policy_answers
    prompts_file = section.prompts_file or str(world_file(registry, config.data.world,
                                                          "reward_train.jsonl"))
    sampling = normalize_sampling(config.normalize)
    key = {"policy": policy.run.id if policy.run else fingerprint_files(policy.path),
           "prompts": fingerprint_files(prompts_file), "settings": section.model_dump(),
           "sampling": asdict(sampling), "max_prompt_tokens": config.normalize.max_prompt_tokens,
           "seed": config.seed}

    def make():
        prompts = read_chat_prompts(prompts_file)[:section.prompts]
        labeler = make_labeler(section.labeler, section.labeler_temperature, config.seed)
        check_request(prompts, section.k, labeler)
        model, tokenizer = load_policy(policy, config)
        collected = collect(model, tokenizer, prompts, section.k, sampling, labeler,
                            seed=config.seed, max_prompt_tokens=config.normalize.max_prompt_tokens,
                            progress="reward: sample the policy's answers")
        print(describe(collected.counts, labeler.report()), file=sys.stderr, flush=True)
        return collected, {"policy": {"path": policy.path,
                                      "run": policy.run.id if policy.run else None},
                           "prompts": prompts_file, "labeler": labeler.report()}

    return cached_collection(registry, key, make)


def load_splits(tokenizer, train_files: list[str], eval_files: list[str],
                config: Config) -> tuple[RankedSet, RankedSet]:
    """Read and encode both splits; without eval files, hold out `eval_fraction` of the prompts."""
    train_rows = read_rows(train_files, config.data)
    if eval_files:
        eval_rows = read_rows(eval_files, config.data, held_out=True)
    else:
        train_rows, eval_rows = hold_out(train_rows, config.data.eval_fraction, config.seed)
    return (encode_rankings(tokenizer, train_rows, config.data, "train"),
            encode_rankings(tokenizer, eval_rows, config.data, "eval"))


def read_rows(sources: list[str], data: DataSection, held_out: bool = False) -> list[dict]:
    """Every ranked row of the sources, each with `_where` = "file:line" for messages."""
    hub = data.eval_hub_split() if held_out else data.hub_split()
    return [{**row, "_where": f"{source}:{row['_line']}"} for source in sources
            for row in load_ranked_rows(source, data.format, data.columns, hub)]


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split into (train, eval) rows, each keeping the file order."""
    n_eval = max(1, round(len(rows) * fraction))
    if len(rows) - n_eval < 1:
        raise UserError(f"only {len(rows)} ranked prompts: too few to hold out an eval set; add "
                        f"data or name held-out files in data.eval_files")
    order = np.random.default_rng(seed).permutation(len(rows))
    eval_index = set(order[:n_eval].tolist())
    return ([row for i, row in enumerate(rows) if i not in eval_index],
            [row for i, row in enumerate(rows) if i in eval_index])


def encode_rankings(tokenizer, rows: list[dict], data: DataSection, split: str) -> RankedSet:
    """Encode every answer as prompt + answer ending at its EOS, applying the truncation policy."""
    ranked = RankedSet(read=len(rows))
    for row in rows:
        sequences, cut = encode_ranked_row(tokenizer, row, data.max_length, row["_where"])
        if cut and data.truncation == "drop":
            ranked.dropped += 1
            continue
        ranked.truncated += cut
        ranked.rows.append(row)
        ranked.sequences.append(sequences)
    if not ranked.rows:
        raise UserError(f"all {ranked.read} {split} prompts were dropped: an answer is longer than "
                        f"data.max_length={data.max_length} tokens with data.truncation=drop; raise "
                        f"data.max_length or use data.truncation=truncate")
    return ranked


def collate_rankings(sequences: list[list[list[int]]], rank_lists: list[list[int]],
                     pad_id: int, shared_prompt: bool) -> dict[str, torch.Tensor]:
    """One micro-batch's prompts, their answers scored in a single forward pass.

    sequences[i][k] are the token ids of prompt i's answer k, rank_lists[i][k] its rank (0 = best).
    With `shared_prompt`, a `pack_shared_prompts` batch: one block per prompt. Without,
    input_ids and attention_mask (N, T), right-padded, one row per answer. Both add group_ids
    and ranks (N,) as `kwise_ranking_loss` takes them, N = the total number of answers.
    """
    if shared_prompt:
        batch = pack_shared_prompts(sequences, pad_id)
    else:
        input_ids, attention_mask = right_pad([seq for seqs in sequences for seq in seqs], pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    group_ids, ranks = encode_groups(rank_lists)
    return {**batch, "group_ids": group_ids, "ranks": ranks}


# -- loss, evaluation, normalization --------------------------------------------------------------
def ranking_loss(model, batch: dict, loss: LossSection):
    """K-wise ranking loss over one micro-batch (`collate_rankings`); every answer scored once."""
    if "segment_ids" in batch:
        scores = packed_scores(model, batch)  # (N,)
    else:
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    value, stats = kwise_ranking_loss(scores, batch["group_ids"], batch["ranks"],
                                      margin=loss.margin, center_coef=loss.center_coef)
    return value, {"pairwise_accuracy": stats["pairwise_accuracy"],
                   "score_mean": scores.detach().mean()}


def score_batch_size(config: Config) -> int:
    """Answers per batch when only scoring: about as many as a training micro-batch holds."""
    return config.train.batch_size * 4


def held_out_metrics(model, eval_set: RankedSet, batch_size: int, shift: float,
                     shared_prompt: bool) -> dict:
    """`pipeline.ranking.ranking_metrics` of the eval rankings, on the model's scores minus
    `shift`."""
    return scores_metrics(held_out_scores(model, eval_set, batch_size, shared_prompt), eval_set,
                          shift)


def held_out_scores(model, eval_set: RankedSet, batch_size: int,
                    shared_prompt: bool) -> list[list[float]]:
    """The model's raw scores of the eval answers, a list per prompt (see `score_groups`)."""
    return score_groups(model, eval_set.sequences, batch_size, shared_prompt,
                        progress="reward: score held-out answers")


def scores_metrics(score_lists: list[list[float]], eval_set: RankedSet, shift: float) -> dict:
    """`pipeline.ranking.ranking_metrics` of the eval rankings, on `score_lists` minus `shift`."""
    score_lists = [[score - shift for score in scores] for scores in score_lists]
    return ranking_metrics(score_lists, [row["ranks"] for row in eval_set.rows])


def flat_metrics(metrics: dict, scale_free: bool) -> dict[str, float]:
    """Metric series for the registry. Scale-free ones (accuracy, tau) do not move with the
    normalization shift, so they can be logged before it; mean scores only after."""
    if scale_free:
        values = {"eval_pairwise_accuracy": metrics["pairwise_accuracy"],
                  "eval_kendall_tau": metrics["kendall_tau"]}
        values.update({f"eval_accuracy_gap_{gap}": value
                       for gap, value in metrics["accuracy_by_gap"].items()})
        return values
    return {f"eval_mean_score_rank_{rank}": value
            for rank, value in metrics["mean_score_by_rank"].items()}


def normalization_shift(model, eval_set: RankedSet, config: Config, policy: Resolved) -> dict:
    """The mean raw score of the SFT answers (see the module docstring), and what it was taken on.

    Sampled answers are scored as PPO scores them: the prompt as encoded for sampling (its last
    max_prompt_tokens tokens), then the sampled tokens through the EOS, read at the EOS. Answers
    that never end are left out, since PPO gives those its missing-EOS penalty instead of the
    reward model's score (unless none ends: then every answer counts, read at its last token).
    """
    norm = config.normalize
    if norm.answers == "best_ranked":
        seqs = [seq for seqs, row in zip(eval_set.sequences, eval_set.rows)
                for seq, rank in zip(seqs, row["ranks"]) if rank == 0]
        unended = 0
    else:
        prompts = [row["prompt"] for row in eval_set.rows[:norm.prompts]]
        answers = sample_policy(policy, prompts, config)
        seqs = [answer.token_ids for answer in answers if answer.ended] or \
            [answer.token_ids for answer in answers]
        unended = sum(not answer.ended for answer in answers)
    scores = score_sequences(model, seqs, batch_size=score_batch_size(config),
                             progress="reward: score answers to normalize")
    return {"shift": float(np.mean(scores)), "answers": norm.answers, "count": len(seqs),
            "unended": unended}


def sample_policy(policy: Resolved, prompts: list, config: Config) -> list[Answer]:
    """Answers of `policy` to `prompts` (with its own tokenizer), seeded."""
    model, tokenizer = load_policy(policy, config)
    return sample_answers(model, tokenizer, prompts, normalize_sampling(config.normalize),
                          seed=config.seed, max_prompt_tokens=config.normalize.max_prompt_tokens,
                          progress="reward: sample answers to normalize")


def load_policy(policy: Resolved, config: Config):
    """A policy as a causal LM that samples, with its own tokenizer."""
    trust = config.runtime.trust_remote_code
    model = load_causal_lm(policy, trust_remote_code=trust, trainable_adapter=False)
    return model, load_tokenizer(policy.path, trust_remote_code=trust,
                                 revision=policy.revision)


def normalize_sampling(norm: NormalizeSection) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=norm.max_new_tokens, temperature=norm.temperature,
                          top_k=norm.top_k, top_p=norm.top_p)


def describe_metrics(metrics: dict, normalization: dict) -> str:
    gaps = "  ".join(f"{gap}: {value:.3f}" for gap, value in metrics["accuracy_by_gap"].items())
    means = "  ".join(f"{rank}: {value:+.3f}" for rank, value in metrics["mean_score_by_rank"].items())
    return (f"reward: held-out pairwise accuracy {metrics['pairwise_accuracy']:.4f} over "
            f"{metrics['n_pairs']} pairs of {metrics['n_prompts']} prompts; Kendall's tau "
            f"{metrics['kendall_tau']:.4f}\nreward: accuracy by rank gap  {gaps}\n"
            f"reward: mean score by rank (0 = best)  {means}\n"
            f"reward: normalization shift {normalization['shift']:+.4f} (mean raw score of "
            f"{normalization['count']} {normalization['answers'].replace('_', ' ')} answers)")


def reward_marker(metrics: dict, normalization: dict, config: Config) -> dict:
    """The content of `reward_model.json`: what PPO and `rlhf score` check and apply."""
    return {"kind": MARKER_KIND, "shift": normalization["shift"], "normalization": normalization,
            "score_at": "the last non-pad token: the EOS that ends the answer",
            "max_length": config.data.max_length, "metrics": metrics,
            "note": "transformers' sequence-classification head has no bias: plain from_pretrained "
                    "returns raw scores; subtract shift, or load with "
                    "pipeline.reward_model.load_reward_model"}


def write_marker(directory, marker: dict) -> None:
    (directory / REWARD_MARKER).write_text(json.dumps(marker, indent=1, ensure_ascii=False),
                                           encoding="utf-8")
