"""PPO stage: train the SFT policy against the reward model (InstructGPT §3.5, with the N+ details).

    rlhf run ppo --config configs/tiny/ppo.yaml [kl.coef=0.02 ppo.epochs=2 ...]

Reads top to bottom: the policy (`model.policy`, default `sft:latest`) and the reward model
(`model.reward`, default `reward:latest`) → checks (the reward checkpoint is a reward model that
reads the policy's token ids, the policy's tokenizer has an EOS the model knows, prompt and answer
fit the context) and the encoded prompts, all before anything is registered, so bad input leaves no
trace → the reference (a frozen copy of the starting policy; with LoRA the policy with its adapter
disabled, no second copy) and the value model (initialized from the reward model, or a head on the
policy with `value.shared_backbone`) → gold score at the start → the loop: rollout
(`experience.py`) → `ppo.epochs` passes of clipped policy and value updates over
`ppo.minibatches` minibatches (+ the PPO-ptx pretraining loss, + the EMA of the policy) → the KL
controller → metrics, sample answers in the run's `samples.jsonl`, resume states → gold score at
the end → publish.

Tokenizers: the reward model must know every policy token under the same id (checked; the reward
stage may add a pad token of its own on top). Answers are then scored and valued from the sampled
ids directly: nothing is decoded and re-tokenized.

Published: the policy as a plain HF directory (a LoRA adapter merged into it). With `ema.decay` > 0
the published weights are the EMA of the policy, not the last iterate. The value model lives in the
resume states only.

Every model stays in eval mode, training included: dropout is off throughout. (With
`train.gradient_checkpointing` the trained models are in train mode, which transformers needs to
checkpoint, with every dropout probability set to 0, which computes the same.)

Resume: the prompts of step N are a seeded permutation indexed by (seed, N) and the RNG is seeded
from (seed, N, process) before each rollout, so a resumed run samples the very answers an
uninterrupted one would. States hold the policy, the value model, both optimizers and schedulers,
the KL controller, the EMA weights and the RNG.

Several processes: each rolls out its share of the batch (`train.batch_size` episodes); advantages
are whitened with statistics summed over all of them and the logged metrics cover all episodes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.fingerprint import data_fingerprint
from pipeline.data.formats import read_jsonl, read_text_corpus
from pipeline.data.packing import pack_blocks
from pipeline.errors import UserError
from pipeline.loop import step_indices
from pipeline.guard import check_chat_model, check_eos, require_causal_lm
from pipeline.models import count_parameters, load_causal_lm, merge_adapter, own_storage
from pipeline.precision import memory_line
from pipeline.registry import Registry, Resolved, Run
from pipeline.reward_model import load_reward_model
from pipeline.runtime import StageRun, stage_precision
from pipeline.sharding import check_layers
from pipeline.tokenizer import encode_prompt, load_tokenizer
from pipeline.world.cache import world_file
from stages.ppo.config import Config, DataSection
from stages.ppo.evaluation import SamplesFile, describe_result, log_gold, run_summary, start_gold
from stages.ppo.models import Models, build_models, use_packing
from stages.ppo.update import PPOTrainer


@dataclass
class Inputs:
    """Everything checked before the run is registered."""

    tokenizer: object            # the policy's
    start_policy: torch.nn.Module  # the policy as it starts (an SFT LoRA adapter merged in)
    reward_model: torch.nn.Module  # one-label sequence classifier, normalized
    prompts: list[list[int]]     # encoded chat prompts, ending with the assistant header
    prompt_texts: list           # as written in the file (for samples.jsonl)
    eval_prompts: list[str]
    ptx_texts: list[str]
    counts: dict[str, int]
    fingerprint: str


def run(config: Config, registry: Registry, *, restart: bool = False,
        pipeline_id: str | None = None, parents: dict[str, Resolved] | None = None) -> Run:
    stage_precision(config)  # refuses a dtype this device cannot train in, before any write
    if parents is None:
        parents = {"policy": registry.resolve(config.model.policy),
                   "reward": registry.resolve(config.model.reward)}
    inputs = load_inputs(config, registry, parents)
    stage_run = StageRun.open("ppo", config, registry, parents=parents,
                              data_fingerprint=inputs.fingerprint, restart=restart,
                              pipeline_id=pipeline_id)
    if stage_run.reused:
        return stage_run.run
    with stage_run:
        return _train(stage_run, config, inputs)


def load_inputs(config: Config, registry: Registry, parents: dict[str, Resolved]) -> Inputs:
    """Load the starting policy, the reward model and the data, and check that they fit together."""
    trust = config.runtime.trust_remote_code
    # Both load in the trained dtype: the value model is a trainable copy of the reward model.
    dtype = stage_precision(config).weights
    policy_path = require_causal_lm(parents["policy"], "model.policy", trust)
    tokenizer = load_tokenizer(policy_path, trust_remote_code=trust,
                               revision=parents["policy"].revision)
    check_chat_model(policy_path, tokenizer, "model.policy")  # prompt lengths: check_lengths
    start_policy = merge_adapter(load_causal_lm(parents["policy"], trust_remote_code=trust,
                                                trainable_adapter=False, role="model.policy",
                                                dtype=dtype))
    check_eos(tokenizer, start_policy, policy_path)
    reward_model, reward_tokenizer = load_reward_model(parents["reward"], trust_remote_code=trust,
                                                       role="model.reward", dtype=dtype)
    check_shared_vocabulary(tokenizer, reward_tokenizer, parents["reward"].path)
    check_layers(config.runtime, "model.policy", lambda: start_policy)
    check_layers(config.runtime, "model.reward", lambda: reward_model)  # the value model's too
    check_lengths(config, start_policy, reward_model)

    prompts_file = config.data.prompts_file or str(world_file(registry, config.data.world,
                                                              "ppo_prompts.jsonl"))
    prompts, prompt_texts, counts = encode_prompts(tokenizer, prompts_file, config.data)
    eval_file = (config.eval.prompts_path(registry, config.data.world)
                 if config.eval.n_prompts else None)
    eval_prompts = config.eval.prompts(registry, config.data.world)
    ptx_files = ptx_sources(config, registry)
    ptx_texts = read_text_corpus(ptx_files, config.ptx.text_field) if ptx_files else []
    return Inputs(tokenizer=tokenizer, start_policy=start_policy, reward_model=reward_model,
                  prompts=prompts, prompt_texts=prompt_texts, eval_prompts=eval_prompts,
                  ptx_texts=ptx_texts, counts=counts,
                  fingerprint=data_fingerprint([prompts_file, *ptx_files], [], eval_file))


def check_shared_vocabulary(tokenizer, reward_tokenizer, reward_path: str) -> None:
    """The reward and value models read the policy's token ids, so every id must mean the same."""
    reward_vocab = reward_tokenizer.get_vocab()
    differing = [token for token, index in tokenizer.get_vocab().items()
                 if reward_vocab.get(token) != index]
    if differing:
        raise UserError(f"the reward model at {reward_path} uses a different tokenizer than the "
                        f"policy ({len(differing)} tokens differ, e.g. {differing[0]!r}); train the "
                        f"reward model from the policy's lineage (rlhf run reward "
                        f"model.source=sft:latest)")


def check_lengths(config: Config, policy, reward_model) -> None:
    """Prompt + answer (and a pretraining block) must fit every model's position limit."""
    longest = config.data.max_prompt_tokens + config.generation.max_new_tokens
    for name, model in (("policy", policy), ("reward model", reward_model)):
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and longest > limit:
            raise UserError(f"data.max_prompt_tokens + generation.max_new_tokens = {longest} "
                            f"exceeds the {name}'s context of {limit} tokens; lower one of them")
        if limit is not None and config.ptx.coef > 0 and config.ptx.seq_len > limit:
            raise UserError(f"ptx.seq_len={config.ptx.seq_len} exceeds the {name}'s context of "
                            f"{limit} tokens; lower ptx.seq_len")


def encode_prompts(tokenizer, path: str, data: DataSection):
    """Encode every prompt of a JSONL file; too-long ones are truncated or dropped and counted."""


    encoded, texts, truncated, dropped = [], [], 0, 0
    rows = read_jsonl(path)
    for line, row in rows:
        prompt = row.get(data.prompt_field)
        is_chat = isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)
        if not (isinstance(prompt, str) and prompt.strip()) and not is_chat:
            raise UserError(f"{path}:{line}: expected a non-empty text or a list of chat messages "
                            f"in '{data.prompt_field}'; set data.prompt_field to your column")
        try:
            ids = encode_prompt(tokenizer, prompt, sys.maxsize)
        except UserError as err:
            raise UserError(f"{path}:{line}: {err}") from None
        if len(ids) > data.max_prompt_tokens:
            if data.truncation == "drop":
                dropped += 1
                continue
            truncated += 1
            ids = ids[-data.max_prompt_tokens:]  # keep the request and the assistant header
        encoded.append(ids)
        texts.append(prompt)
    if not encoded:
        raise UserError(f"{path}: all {len(rows)} prompts are longer than data.max_prompt_tokens="
                        f"{data.max_prompt_tokens} and were dropped; raise data.max_prompt_tokens "
                        f"or set data.truncation=truncate")
    counts = {"prompts": len(encoded), "prompts_truncated": truncated, "prompts_dropped": dropped}
    return encoded, texts, counts


def ptx_sources(config: Config, registry: Registry) -> list[str]:
    if config.ptx.coef == 0:
        return []
    return list(config.ptx.files) or [str(world_file(registry, config.data.world,
                                                     "pretrain.jsonl"))]


# -- the stage's loop -----------------------------------------------------------------------------
def _train(stage_run, config: Config, inputs: Inputs) -> Run:
    resume_dir = stage_run.resume.path if stage_run.resume else None
    train = config.train
    tokenizer = inputs.tokenizer
    models = build_models(config, inputs.start_policy, inputs.reward_model, tokenizer,
                          resume_dir, stage_precision(config).frozen)
    stage_run.say(describe_setup(config, inputs, models))
    stage_run.say(f"ppo: {use_packing(models, inputs.prompts[0], tokenizer.pad_token_id)}")
    stage_run.say(memory_line("ppo", models.named(), [models.policy, models.critic]))
    gold_start = start_gold(stage_run, models.policy, tokenizer, inputs.eval_prompts, config)
    ptx_blocks = (pack_blocks(inputs.ptx_texts, tokenizer, config.ptx.seq_len)
                  if inputs.ptx_texts else None)
    for trained in (models.policy, models.critic):
        own_storage(trained)  # the same numerics whether the weights were loaded or built
        stage_run.shard(trained)  # before the optimizers, which must hold the sharded parameters
    trainer = PPOTrainer(config, stage_run.accelerator, models, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, ptx_blocks=ptx_blocks)
    if resume_dir is not None:
        trainer.restore(stage_run.load_state(trainer.optimizers, trainer.schedulers,
                                             trainer.optimizer_modules), resume_dir)
    samples = SamplesFile(stage_run.run_dir / "samples.jsonl", stage_run.is_main)
    samples.drop_after(stage_run.start_step)
    bar = stage_run.progress(train.max_steps, "ppo")
    for step in range(stage_run.start_step, train.max_steps):
        rows, episodes = batch_share(config, stage_run.accelerator, len(inputs.prompts), step)
        metrics, experience = trainer.step(step, [inputs.prompts[i] for i in rows], episodes)
        done = step + 1
        if done % train.log_every == 0 or done == train.max_steps:
            stage_run.log(done, metrics)
        bar.set_postfix(rm=f"{metrics['rm_score_mean']:.2f}", kl=f"{metrics['kl']:.2f}",
                        refresh=False)
        bar.update(1)
        if config.samples.every_steps and (done % config.samples.every_steps == 0
                                           or done == train.max_steps):
            samples.write(done, experience, [inputs.prompt_texts[i] for i in rows], tokenizer,
                          config.samples.count)
        if train.eval_every and done % train.eval_every == 0 and done < train.max_steps:
            log_gold(stage_run, done, models.policy, tokenizer, inputs.eval_prompts, config)
        if done % config.checkpoint.every_steps == 0 and done < train.max_steps:
            stage_run.save_state(done, **trainer.state())
    bar.close()
    if trainer.ema is not None:
        trainer.ema.copy_to(models.policy)  # what is evaluated and published is the average
    gold_end = log_gold(stage_run, train.max_steps, models.policy, tokenizer,
                        inputs.eval_prompts, config)
    summary = run_summary(stage_run, config, inputs.counts, gold_start, gold_end)
    stage_run.say(describe_result(summary))
    stage_run.publish(merge_adapter(models.policy), tokenizer, summary=summary)
    return stage_run.registry.get(stage_run.run.id)


def batch_share(config: Config, accelerator, n_prompts: int,
                step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's share of the global batch at `step`, a function of (seed, step) alone: its
    prompt indices and their positions in the batch."""
    procs = accelerator.num_processes
    batch = step_indices(n_prompts, step, config.train.batch_size * procs, config.seed)
    positions = np.arange(len(batch))[accelerator.process_index::procs]
    return batch[positions], positions


def describe_setup(config: Config, inputs: Inputs, models: Models) -> str:
    counts = inputs.counts
    value = "a value head on the policy" if models.value_head is not None else \
        "a value model initialized from the reward model"
    return (f"ppo: {counts['prompts']} prompts ({counts['prompts_truncated']} truncated to their "
            f"last {config.data.max_prompt_tokens} tokens, {counts['prompts_dropped']} dropped); "
            f"{count_parameters(models.policy, trainable_only=True):,} trainable policy parameters"
            f"{' (LoRA)' if config.lora.enabled else ''}; {value}")
