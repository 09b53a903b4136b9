"""PPO stage: train the SFT policy against the reward model (InstructGPT §3.5, with the N+ details).

    rlhf run ppo --config configs/tiny/ppo.yaml [kl.coef=0.02 ppo.epochs=2 ...]

Reads top to bottom: the policy (`model.policy`, default `sft:latest`) and the reward model
(`model.reward`, default `reward:latest`) → checks (the reward checkpoint is a reward model that
reads the policy's token ids, the policy's tokenizer has an EOS the model knows, prompt and answer
fit the context) and the encoded prompts, all before anything is registered, so bad input leaves no
trace → the reference (a frozen copy of the starting policy; with LoRA the policy with its adapter
disabled, no second copy) and the value model (initialized from the reward model, or a head on the
policy with `value.shared_backbone`) → gold score at the start → the loop: rollout
(`stages/ppo/rollout.py`) → `ppo.epochs` passes of clipped policy and value updates over
`ppo.minibatches` minibatches (+ the PPO-ptx pretraining loss, + the EMA of the policy) → the KL
controller → metrics, sample answers in the run's `samples.jsonl`, resume states → gold score at
the end → publish.

Tokenizers: the reward model must know every policy token under the same id (checked; the reward
stage may add a pad token of its own on top). Answers are then scored and valued from the sampled
ids directly: nothing is decoded and re-tokenized.

Published: the policy as a plain HF directory (a LoRA adapter merged into it). With `ema.decay` > 0
the published weights are the EMA of the policy, not the last iterate. The value model lives in the
resume states only.

Every model stays in eval mode, training included: dropout is off throughout.

Resume: the prompts of step N are a seeded permutation indexed by (seed, N) and the RNG is seeded
from (seed, N, process) before each rollout, so a resumed run samples the very answers an
uninterrupted one would. States hold the policy, the value model, both optimizers and schedulers,
the KL controller, the EMA weights and the RNG.

Several processes: each rolls out its share of the batch (`train.batch_size` episodes); advantages
are whitened with statistics summed over all of them and the logged metrics cover all episodes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from pipeline.config import LoraConfig, Section, StageConfig
from pipeline.errors import UserError
from pipeline.registry import Registry, Resolved, Run
from pipeline.sources import WorldSection, world_file
from stages.ppo.losses import (AdaptiveKLController, FixedKLController, KLController,
                               explained_variance, logprobs_from_logits, policy_loss, value_loss)
from stages.ppo.rollout import (Experience, Models, SafetensorsModule, TokenScorer, ValueHead,
                                critic_values, make_experience, response_logits, side_by_side)
from stages.ppo.sampling import episode_keys


# -- config ---------------------------------------------------------------------------------------
class ModelSection(Section):
    policy: str = Field("sft:latest", description="the policy to train (and the reference): a "
                        "registry reference, a local HF directory or a hub name")
    reward: str = Field("reward:latest", description="the reward model (frozen; it also initializes "
                        "the value model)")


class DataSection(Section):
    prompts_file: str | None = Field(None, description="JSONL of prompts (text or chat messages); "
                                     "empty = the embedded world's ppo_prompts.jsonl")
    prompt_field: str = Field("prompt", description="the column that holds the prompt")
    world: WorldSection = Field(default_factory=WorldSection)
    max_prompt_tokens: int = Field(96, ge=1, description="prompt tokens, chat framing included")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="a longer prompt: keep its last max_prompt_tokens tokens, or drop "
                                "it; both are counted and reported")


class GenerationSection(Section):
    max_new_tokens: int = Field(64, ge=1, description="answer length limit")
    min_new_tokens: int = Field(0, ge=0, description="EOS is blocked before this many tokens")
    temperature: float = Field(0.7, gt=0, description="sampling temperature (N+ 0.7, InstructGPT 1)")
    top_k: int = Field(0, ge=0, description="0 = no top-k filtering")
    top_p: float = Field(1.0, gt=0, le=1, description="1 = no nucleus filtering")


class RewardSection(Section):
    missing_eos_penalty: float | None = Field(
        -1.0, description="the score of an answer that never emits EOS (null = the reward "
                          "model's score at its last token)")


class KLSection(Section):
    coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty (initial, if adaptive)")
    estimator: Literal["k1", "k3"] = Field("k1", description="k1 = log π − log π_ref; k3 = "
                                           "(r − 1) − log r, never negative")
    adaptive: bool = Field(False, description="move β toward kl.target (Ziegler et al.)")
    target: float = Field(6.0, gt=0, description="target KL per answer (adaptive)")
    horizon: int = Field(10000, ge=1, description="episodes over which β moves ≤ 20% (adaptive)")


class PPOSection(Section):
    epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass")
    clip_eps: float = Field(0.2, gt=0, description="policy ratio clip range")
    value_clip_eps: float = Field(0.2, gt=0, description="value clip range around rollout values")
    value_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    whiten_rewards: bool = Field(False, description="scale rewards to unit variance before GAE")
    side_by_side: bool = Field(True, description="on a CPU, one intra-op thread per model pass and "
                               "independent passes (reference, value, reward; policy and value "
                               "updates) at the same time, instead of every pass on all threads: "
                               "faster for small models and on shared CPUs")


class ValueSection(Section):
    shared_backbone: bool = Field(False, description="a value head on the policy instead of a "
                                  "separate value model initialized from the reward model")
    lr: float | None = Field(None, gt=0, description="value learning rate; empty = train.lr")


class PtxSection(Section):
    coef: float = Field(0.0, ge=0, description="γ of PPO-ptx (InstructGPT 27.8); 0 = off")
    files: list[str] = Field(default_factory=list, description="pretraining text; empty = the "
                             "embedded world's pretrain.jsonl")
    text_field: str = "text"
    batch_size: int = Field(4, ge=1, description="pretraining blocks per micro-batch")
    seq_len: int = Field(128, ge=8, description="tokens per pretraining block")


class EmaSection(Section):
    decay: float = Field(0.0, ge=0, lt=1, description="EMA of the policy weights, published "
                         "instead of the last iterate (InstructGPT 0.992); 0 = off")


class EvalSection(Section):
    prompts_file: str | None = Field(None, description="JSONL of {prompt} for the gold eval; "
                                     "empty = the world's eval_prompts.jsonl")
    n_prompts: int = Field(64, ge=0, description="prompts in the gold eval at start and end "
                           "(and every train.eval_every steps); 0 skips it")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    sampled_answers: int = Field(0, ge=0, description="also score this many answers per prompt "
                                 "sampled as in training (generation.temperature, top_k, top_p), "
                                 "logged as gold_sampled/...: PPO optimizes the sampled answers, "
                                 "and a greedy answer can hide how they changed; 0 = off")


class SamplesSection(Section):
    every_steps: int = Field(10, ge=0, description="steps between sample dumps; 0 = never")
    count: int = Field(4, ge=1, description="answers written each time")


class Config(StageConfig):
    """`train.batch_size` = episodes per step per process; `train.grad_accum` = micro-batches per
    minibatch; lr schedule and grad clipping as elsewhere."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    kl: KLSection = Field(default_factory=KLSection)
    ppo: PPOSection = Field(default_factory=PPOSection)
    value: ValueSection = Field(default_factory=ValueSection)
    ptx: PtxSection = Field(default_factory=PtxSection)
    ema: EmaSection = Field(default_factory=EmaSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)
    lora: LoraConfig = Field(default_factory=LoraConfig)


def check_config(config: Config) -> None:
    """Rules a single field's type cannot state."""
    if config.train.batch_size < 2:
        raise UserError("train.batch_size must be at least 2: advantages are whitened over the "
                        "batch, which needs two answers' tokens")
    per_minibatch = config.ppo.minibatches * config.train.grad_accum
    if config.train.batch_size % per_minibatch:
        raise UserError(f"train.batch_size={config.train.batch_size} does not split into "
                        f"ppo.minibatches={config.ppo.minibatches} × train.grad_accum="
                        f"{config.train.grad_accum} equal parts; make it a multiple of "
                        f"{per_minibatch}")
    if config.generation.min_new_tokens > config.generation.max_new_tokens:
        raise UserError(f"generation.min_new_tokens={config.generation.min_new_tokens} exceeds "
                        f"generation.max_new_tokens={config.generation.max_new_tokens}")


# -- inputs ---------------------------------------------------------------------------------------
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
    from pipeline.runtime import StageRun

    check_config(config)
    if parents is None:
        parents = {"policy": registry.resolve(config.model.policy),
                   "reward": registry.resolve(config.model.reward)}
    inputs = load_inputs(config, registry, parents)
    stage_run = StageRun.open("ppo", config, registry, parents=parents,
                              data_fingerprint=inputs.fingerprint, restart=restart,
                              pipeline_id=pipeline_id)
    if stage_run.reused:
        return stage_run.run
    try:
        return _train(stage_run, config, inputs)
    except BaseException as err:
        stage_run.fail("interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
        raise


def load_inputs(config: Config, registry: Registry, parents: dict[str, Resolved]) -> Inputs:
    """Load the starting policy, the reward model and the data, and check that they fit together."""
    from pipeline.data import read_text_corpus
    from pipeline.evaluate import read_prompts
    from pipeline.models import checked_path, load_causal_lm, merge_adapter
    from pipeline.scoring import load_reward_model
    from pipeline.tokenizer import load_tokenizer
    from stages.sft import fingerprint

    trust = config.runtime.trust_remote_code
    policy_path = checked_path(parents["policy"])
    tokenizer = load_tokenizer(policy_path, trust_remote_code=trust)
    start_policy = merge_adapter(load_causal_lm(parents["policy"], trust_remote_code=trust,
                                                trainable_adapter=False))
    check_eos(tokenizer, start_policy, policy_path)
    reward_model, reward_tokenizer = load_reward_model(parents["reward"], trust_remote_code=trust)
    check_shared_vocabulary(tokenizer, reward_tokenizer, parents["reward"].path)
    check_context(config, start_policy, reward_model)

    prompts_file = config.data.prompts_file or str(world_file(registry, config.data.world,
                                                              "ppo_prompts.jsonl"))
    prompts, prompt_texts, counts = encode_prompts(tokenizer, prompts_file, config.data)
    eval_file = None
    eval_prompts: list[str] = []
    if config.eval.n_prompts:
        eval_file = config.eval.prompts_file or str(world_file(registry, config.data.world,
                                                               "eval_prompts.jsonl"))
        eval_prompts = read_prompts(eval_file, config.eval.n_prompts)
    ptx_files = ptx_sources(config, registry)
    ptx_texts = read_text_corpus(ptx_files, config.ptx.text_field) if ptx_files else []
    return Inputs(tokenizer=tokenizer, start_policy=start_policy, reward_model=reward_model,
                  prompts=prompts, prompt_texts=prompt_texts, eval_prompts=eval_prompts,
                  ptx_texts=ptx_texts, counts=counts,
                  fingerprint=fingerprint([prompts_file, *ptx_files], [], eval_file))


def check_eos(tokenizer, policy, policy_path: str) -> None:
    """Answers end at EOS: the tokenizer needs one, and the model must have been trained with it."""
    eos = tokenizer.eos_token_id
    if eos is None or eos >= policy.get_input_embeddings().num_embeddings:
        raise UserError(f"the policy's tokenizer at {policy_path} has no EOS token the model "
                        f"knows, so sampled answers could never end; use a policy whose tokenizer "
                        f"defines eos_token (e.g. the output of `rlhf run sft`)")


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


def check_context(config: Config, policy, reward_model) -> None:
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
    import sys

    from pipeline.data import read_jsonl
    from pipeline.tokenizer import encode_prompt

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


# -- models ---------------------------------------------------------------------------------------
def build_models(config: Config, inputs: Inputs, resume_dir: Path | None) -> Models:
    """Policy, reference, reward and value models, from the inputs or from a resume state."""
    from pipeline.models import apply_lora, load_causal_lm

    start_policy = inputs.start_policy
    if len(inputs.tokenizer) > start_policy.get_input_embeddings().num_embeddings:
        start_policy.resize_token_embeddings(len(inputs.tokenizer))  # a role token the model lacks
    if config.lora.enabled:
        # The adapter is the only trainable part; disabling it gives back the reference.
        if resume_dir is None:
            policy = apply_lora(start_policy, config.lora)
        else:
            from peft import PeftModel
            policy = PeftModel.from_pretrained(start_policy, resume_dir / "model", is_trainable=True)
        reference = None
    else:
        reference = frozen(start_policy if resume_dir else copy.deepcopy(start_policy))
        policy = (load_causal_lm(Resolved(str(resume_dir / "model")),
                                 trust_remote_code=config.runtime.trust_remote_code)
                  if resume_dir else start_policy).requires_grad_(True)  # a merged adapter froze it
    value_model = value_head = None
    if config.value.shared_backbone:
        value_head = ValueHead(policy.config.hidden_size)
    else:  # a trainable copy, made before the reward model is frozen
        value_model = TokenScorer(copy.deepcopy(inputs.reward_model).requires_grad_(True))
    models = Models(policy=policy.eval(), reference=reference,
                    reward_model=frozen(TokenScorer(inputs.reward_model)),
                    value_model=value_model, value_head=value_head)
    if resume_dir is not None:
        models.critic.load_pretrained(resume_dir / "value")
    return models


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.requires_grad_(False).eval()


class PolicyEMA(SafetensorsModule):
    """Exponential moving average of the policy's trainable weights (float32), updated after every
    policy optimizer step: w_ema ← decay · w_ema + (1 − decay) · w."""

    def __init__(self, policy: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        for name, param in trainable(policy):
            # Buffer names cannot hold dots; '/' keeps the parameter's name readable in the file.
            self.register_buffer(name.replace(".", "/"), param.detach().float().clone())

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        for average, (_, param) in zip(self.buffers(), trainable(policy)):
            average.lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, policy: torch.nn.Module) -> None:
        for average, (_, param) in zip(self.buffers(), trainable(policy)):
            param.copy_(average)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def build_optimizers(config: Config, models: Models, device: torch.device):
    """AdamW for the policy (with the value head when shared) and for the value model; each with
    the warmup + cosine schedule, stepped once per PPO step."""
    from pipeline.trainer import warmup_cosine

    train = config.train
    value_lr = config.value.lr or train.lr
    fused = device.type == "cuda"

    def adamw(groups):
        # foreach on a CPU too: one call per step instead of one per tensor.
        return torch.optim.AdamW(groups, weight_decay=train.weight_decay, betas=(0.9, 0.95),
                                 eps=1e-5, fused=fused, foreach=not fused)

    policy_group = {"params": [param for _, param in trainable(models.policy)], "lr": train.lr}
    if models.value_head is not None:
        optimizers = {"policy": adamw([policy_group, {"params": list(models.value_head.parameters()),
                                                      "lr": value_lr}])}
    else:
        optimizers = {"policy": adamw([policy_group]),
                      "value": adamw([{"params": list(models.value_model.parameters()),
                                       "lr": value_lr}])}
    schedulers = {name: warmup_cosine(optimizer, train.warmup_steps, train.max_steps,
                                      train.min_lr_ratio) for name, optimizer in optimizers.items()}
    return optimizers, schedulers


def make_kl_controller(config: Config) -> KLController:
    if config.kl.adaptive:
        return AdaptiveKLController(config.kl.coef, config.kl.target, config.kl.horizon)
    return FixedKLController(config.kl.coef)


@contextmanager
def intra_op_threads(count: int):
    """Run the block with `count` intra-op threads (threads started inside it get that count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def step_seed(seed: int, step: int, process: int) -> int:
    """The RNG seed of one process's rollout at one step: resume needs no RNG from the past."""
    return int(np.random.SeedSequence([seed, step, process]).generate_state(1)[0])


# -- one PPO step: rollout + update ---------------------------------------------------------------
class PPOTrainer:
    """Models, optimizers, the KL controller and the EMA, and `step()`: one rollout and its update.

    The stage and `benchmarks/ppo_throughput.py` both drive this class.
    """

    def __init__(self, config: Config, accelerator, models: Models, *, eos_token_id: int,
                 pad_token_id: int, ptx_blocks: torch.Tensor | None = None):
        self.config = config
        self.accelerator = accelerator
        self.models = models
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.ptx_blocks = ptx_blocks
        self.kl_controller = make_kl_controller(config)
        optimizers, self.schedulers = build_optimizers(config, models, accelerator.device)
        # Distributed wrappers for the update; rollouts use the plain modules in `models`.
        self.policy, self.critic, *prepared = accelerator.prepare(models.policy, models.critic,
                                                                 *optimizers.values())
        self.optimizers = dict(zip(optimizers, prepared))
        for frozen_model in (models.reference, models.reward_model):
            if frozen_model is not None:
                frozen_model.to(accelerator.device)
        self.ema = PolicyEMA(models.policy, config.ema.decay) if config.ema.decay > 0 else None
        # Threads for passes side by side (each with one intra-op thread); 1 = the usual way.
        on_cpu = accelerator.device.type == "cpu"
        self.workers = torch.get_num_threads() if config.ppo.side_by_side and on_cpu else 1

    def state(self) -> dict:
        """The keyword arguments of `StageRun.save_state` (which adds the RNG)."""
        models = {"model": self.models.policy, "value": self.models.critic}
        if self.ema is not None:
            models["ema"] = self.ema
        return {"models": models, "optimizers": self.optimizers, "schedulers": self.schedulers,
                "extra": {"kl_controller": self.kl_controller.state_dict()}}

    def restore(self, extra: dict, resume_dir: Path) -> None:
        """What `StageRun.load_state` does not restore itself (models are loaded by build_models)."""
        self.kl_controller.load_state_dict(extra["kl_controller"])
        if self.ema is not None:
            self.ema.load_pretrained(resume_dir / "ema")

    def step(self, step: int, prompts: list[list[int]],
             episodes: Sequence[int]) -> tuple[dict[str, float], Experience]:
        """Roll out this process's `prompts`, update policy and value; the step's metrics.

        `episodes`: the prompts' positions in the step's global batch, which key their sampling.
        """
        accelerator = self.accelerator
        keys = episode_keys(self.config.seed, step, episodes)
        torch.manual_seed(step_seed(self.config.seed, step, accelerator.process_index))
        started = time.perf_counter()
        timings: dict[str, float] = {}
        kl_coef = self.kl_controller.value
        with intra_op_threads(1 if self.workers > 1 else torch.get_num_threads()):
            with accelerator.autocast():
                experience = make_experience(
                    self.models, prompts, keys, self.config, kl_coef,
                    eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id, timings=timings, workers=self.workers,
                    sum_over_processes=lambda tensor: accelerator.reduce(tensor, "sum"))
            update_started = time.perf_counter()
            losses = self.update(experience, step)
        for scheduler in self.schedulers.values():
            scheduler.step()
        timings["time_update"] = time.perf_counter() - update_started
        metrics = {**self.rollout_metrics(experience, kl_coef), **losses, **timings}
        episodes = len(experience) * accelerator.num_processes
        self.kl_controller.update(metrics["kl"], n_steps=episodes)
        metrics.update(kl_coef=kl_coef, lr=self.schedulers["policy"].get_last_lr()[0],
                       episodes_per_s=episodes / (time.perf_counter() - started))
        return metrics, experience

    def update(self, experience: Experience, step: int) -> dict[str, float]:
        """`ppo.epochs` passes over the batch in `ppo.minibatches` shuffled minibatches, each split
        into `train.grad_accum` micro-batches; one optimizer step per minibatch. Returns the mean
        losses and statistics over all micro-batches and processes."""
        ppo, accum = self.config.ppo, self.config.train.grad_accum
        micro_per_step = ppo.epochs * ppo.minibatches * accum
        totals: dict[str, float] = defaultdict(float)
        micro = 0
        for _ in range(ppo.epochs):
            for minibatch in torch.randperm(len(experience)).chunk(ppo.minibatches):
                for rows in minibatch.chunk(accum):
                    ptx_index = step * micro_per_step + micro if self.ptx_blocks is not None \
                        else None
                    stats = self.backward(experience.rows(rows), 1.0 / accum, ptx_index)
                    for name, value in stats.items():
                        totals[name] += float(value)
                    micro += 1
                self.optimizer_step()
        local = torch.tensor([total / micro for total in totals.values()],
                             device=self.accelerator.device)
        return dict(zip(totals, self.accelerator.reduce(local, "mean").tolist()))

    def backward(self, batch: Experience, scale: float, ptx_index: int | None) -> dict:
        """Backpropagate one micro-batch: the clipped policy loss (+ PPO-ptx) and value_coef × the
        clipped value loss. A value head shares the policy's forward and backward pass; a separate
        value model's pass runs beside the policy's (`side_by_side`; one process only, since two
        threads could issue the processes' gradient all-reduces in different orders)."""
        if self.models.value_head is None:
            policy_stats, value_stats = side_by_side(
                lambda: self.policy_backward(batch, scale, ptx_index),
                lambda: self.value_backward(batch, scale),
                workers=self.workers if self.accelerator.num_processes == 1 else 1)
            return {**policy_stats, **value_stats}
        with self.accelerator.autocast():
            logits, hidden = response_logits(self.policy, batch.sequences, batch.attention_mask,
                                             batch.response_width, with_hidden=True)
            pg_loss, stats = self.policy_objective(batch, logits)
            vf_loss, value_stats = self.value_objective(batch, self.critic(hidden))
        self.accelerator.backward((pg_loss + self.config.ppo.value_coef * vf_loss) * scale)
        stats.update(value_stats)
        if ptx_index is not None:
            stats["ptx_loss"] = self.ptx_backward(ptx_index, scale)
        return stats

    def policy_backward(self, batch: Experience, scale: float, ptx_index: int | None) -> dict:
        with self.accelerator.autocast():
            logits, _ = response_logits(self.policy, batch.sequences, batch.attention_mask,
                                        batch.response_width)
            pg_loss, stats = self.policy_objective(batch, logits)
        self.accelerator.backward(pg_loss * scale)
        if ptx_index is not None:
            stats["ptx_loss"] = self.ptx_backward(ptx_index, scale)
        return stats

    def value_backward(self, batch: Experience, scale: float) -> dict:
        with self.accelerator.autocast():
            values = critic_values(self.critic, batch.sequences, batch.attention_mask,
                                   batch.response_width)
            vf_loss, stats = self.value_objective(batch, values)
        self.accelerator.backward(self.config.ppo.value_coef * vf_loss * scale)
        return stats

    def policy_objective(self, batch: Experience, logits: torch.Tensor):
        """(clipped policy loss, its statistics) from the (B, T, V) logits of the response."""
        logprobs = logprobs_from_logits(logits, batch.responses, self.config.generation.temperature)
        loss, stats = policy_loss(logprobs, batch.logprobs, batch.advantages, batch.response_mask,
                                  self.config.ppo.clip_eps)
        return loss, {"policy_loss": loss.detach(), **stats}

    def value_objective(self, batch: Experience, values: torch.Tensor):
        """(clipped value loss, its statistics) from the (B, T) values of the states."""
        loss, stats = value_loss(values, batch.values, batch.returns, batch.response_mask,
                                 self.config.ppo.value_clip_eps)
        return loss, {"value_loss": loss.detach(), **stats}

    def ptx_backward(self, index: int, scale: float) -> float:
        """PPO-ptx: ptx.coef × next-token loss on the `index`-th batch of pretraining blocks.

        Its own backward pass, so the graph of the PPO loss is freed first.
        """
        from pipeline.trainer import step_indices

        ptx, procs = self.config.ptx, self.accelerator.num_processes
        indices = step_indices(len(self.ptx_blocks), index, ptx.batch_size * procs,
                               self.config.seed)[self.accelerator.process_index::procs]
        blocks = self.ptx_blocks[torch.from_numpy(indices)].to(self.accelerator.device)
        with self.accelerator.autocast():
            logits, _ = response_logits(self.policy, blocks, torch.ones_like(blocks),
                                        blocks.shape[1] - 1)
            loss = -logprobs_from_logits(logits, blocks[:, 1:]).mean()
        self.accelerator.backward(ptx.coef * loss * scale)
        return loss.item()

    def optimizer_step(self) -> None:
        max_norm = self.config.train.max_grad_norm
        for optimizer in self.optimizers.values():
            if max_norm > 0:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                self.accelerator.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.models.policy)

    def rollout_metrics(self, experience: Experience, kl_coef: float) -> dict[str, float]:
        """Batch statistics over every process's episodes."""
        gather = self.accelerator.gather
        mask = experience.response_mask
        kl_per_answer = experience.kl.sum(dim=1)
        per_episode = {
            "rm_score": experience.rm_scores, "score": experience.scores, "kl": kl_per_answer,
            "reward": experience.scores - kl_coef * kl_per_answer,
            "response_length": mask.sum(dim=1), "eos_rate": experience.ended}
        gathered = {name: gather(values.float().contiguous()) for name, values in per_episode.items()}
        metrics = {name: values.mean().item() for name, values in gathered.items()}
        metrics["rm_score_mean"] = metrics.pop("rm_score")
        metrics["rm_score_std"] = gathered["rm_score"].std(correction=0).item()
        local = torch.stack([experience.entropy.float(),
                             explained_variance(experience.values, experience.returns, mask).float()])
        metrics["entropy"], explained = self.accelerator.reduce(local, "mean").tolist()
        if math.isfinite(explained):  # undefined (NaN) when every return is the same
            metrics["explained_variance"] = explained
        return metrics


# -- the stage's loop -----------------------------------------------------------------------------
def _train(stage_run, config: Config, inputs: Inputs) -> Run:
    from pipeline.models import merge_adapter
    from stages.pretrain import pack_blocks

    resume_dir = stage_run.resume.path if stage_run.resume else None
    train = config.train
    tokenizer = inputs.tokenizer
    models = build_models(config, inputs, resume_dir)
    stage_run.say(describe_setup(config, inputs, models))
    gold_start = start_gold(stage_run, models.policy, tokenizer, inputs.eval_prompts, config)
    ptx_blocks = (pack_blocks(inputs.ptx_texts, tokenizer, config.ptx.seq_len)
                  if inputs.ptx_texts else None)
    trainer = PPOTrainer(config, stage_run.accelerator, models, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, ptx_blocks=ptx_blocks)
    if resume_dir is not None:
        trainer.restore(stage_run.load_state(trainer.optimizers, trainer.schedulers), resume_dir)
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
    summary = run_summary(stage_run, config, inputs, gold_start, gold_end)
    stage_run.say(describe_result(summary))
    stage_run.publish(merge_adapter(models.policy), tokenizer, summary=summary)
    return stage_run.registry.get(stage_run.run.id)


def batch_share(config: Config, accelerator, n_prompts: int,
                step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's share of the global batch at `step`, a function of (seed, step) alone: its
    prompt indices and their positions in the batch."""
    from pipeline.trainer import step_indices

    procs = accelerator.num_processes
    batch = step_indices(n_prompts, step, config.train.batch_size * procs, config.seed)
    positions = np.arange(len(batch))[accelerator.process_index::procs]
    return batch[positions], positions


def describe_setup(config: Config, inputs: Inputs, models: Models) -> str:
    counts = inputs.counts
    trainable_params = sum(p.numel() for _, p in trainable(models.policy))
    value = "a value head on the policy" if models.value_head is not None else \
        "a value model initialized from the reward model"
    return (f"ppo: {counts['prompts']} prompts ({counts['prompts_truncated']} truncated to their "
            f"last {config.data.max_prompt_tokens} tokens, {counts['prompts_dropped']} dropped); "
            f"{trainable_params:,} trainable policy parameters"
            f"{' (LoRA)' if config.lora.enabled else ''}; {value}")


# -- gold evaluation, samples, summary ------------------------------------------------------------
# The metric prefixes: answers at eval.temperature; answers sampled as in training.
GOLD_SERIES = ("gold", "gold_sampled")


def measure_gold(policy, tokenizer, prompts: list[str], config: Config) -> dict[str, dict]:
    """Gold summaries of answers to the held-out prompts, by series: `gold` (eval.temperature,
    0 = greedy) and, when eval.sampled_answers > 0, `gold_sampled` (that many answers per prompt,
    sampled with the rollout's settings)."""
    from pipeline.generation import SamplingConfig, gold_eval

    evaluation, generation = config.eval, config.generation
    sampling = SamplingConfig(max_new_tokens=evaluation.max_new_tokens,
                              temperature=evaluation.temperature)
    summaries = {"gold": gold_eval(policy, tokenizer, prompts, sampling, seed=config.seed)}
    if evaluation.sampled_answers:
        repeated = [prompt for prompt in prompts for _ in range(evaluation.sampled_answers)]
        as_in_training = replace(sampling, temperature=generation.temperature,
                                 top_k=generation.top_k, top_p=generation.top_p)
        summaries["gold_sampled"] = gold_eval(policy, tokenizer, repeated, as_in_training,
                                              seed=config.seed)
    return summaries


def log_gold(stage_run, step: int, policy, tokenizer, prompts: list[str],
             config: Config) -> dict[str, dict]:
    """Gold-evaluate the policy and log `gold/...` (and `gold_sampled/...`) at `step`; {} when
    the eval is off."""
    from pipeline.generation import gold_metrics

    if not prompts:
        return {}
    summaries = measure_gold(policy, tokenizer, prompts, config)
    stage_run.log(step, {name: value for series, summary in summaries.items()
                         for name, value in gold_metrics(summary, series).items()})
    return summaries


def start_gold(stage_run, policy, tokenizer, prompts: list[str], config: Config) -> dict[str, dict]:
    """The starting policy's gold summaries: measured and logged at step 0 by a new run, read
    back from the registry by a resumed one (a resume keeps the metrics of step 0)."""
    logged: dict[str, dict] = {}
    for name, series in stage_run.registry.metrics(stage_run.run.id).items():
        prefix, _, metric = name.partition("/")
        if prefix in GOLD_SERIES and series[0][0] == 0:
            logged.setdefault(prefix, {})[metric] = series[0][1]
    if logged or not prompts:
        return logged
    return log_gold(stage_run, 0, policy, tokenizer, prompts, config)


class SamplesFile:
    """`samples.jsonl` in the run directory: a few answers every `samples.every_steps` steps."""

    def __init__(self, path: Path, is_main: bool):
        self.path = path
        self.enabled = is_main

    def drop_after(self, step: int) -> None:
        """A resumed run writes the samples after its resume step again: drop the old ones."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        # errors="replace": a kill mid-write may have cut a character as well as a line.
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the partial last line of a write that a kill cut short
                continue
            if row["step"] <= step:
                kept.append(line)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(temporary, self.path)  # a kill now leaves the old file or the new one

    def write(self, step: int, experience: Experience, prompts: list, tokenizer, count: int) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in range(min(count, len(experience))):
                answer = experience.responses[row][experience.response_mask[row].bool()]
                handle.write(json.dumps({
                    "step": step, "prompt": prompts[row],
                    "response": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                    "rm_score": round(experience.rm_scores[row].item(), 4),
                    "ended_with_eos": bool(experience.ended[row])}, ensure_ascii=False) + "\n")


def run_summary(stage_run, config: Config, inputs: Inputs, gold_start: dict, gold_end: dict) -> dict:
    """Counts, gold before/after, and the first and last values of the main training curves."""
    series = stage_run.registry.metrics(stage_run.run.id)
    summary: dict = dict(inputs.counts, published="ema" if config.ema.decay > 0 else "policy")
    for name in ("rm_score_mean", "kl", "response_length", "eos_rate"):
        if name in series:
            summary[f"{name}_start"] = series[name][0][1]
            summary[f"{name}_end"] = series[name][-1][1]
    for when, summaries in (("start", gold_start), ("end", gold_end)):
        for series, gold in summaries.items():
            summary.update({f"{series}_{when}/{k}": v for k, v in gold.items()
                            if isinstance(v, (int, float))})
    if gold_end.get("gold", {}).get("samples"):
        summary["gold_samples"] = gold_end["gold"]["samples"][:3]
    return summary


def describe_result(summary: dict) -> str:
    parts = []
    for label, start, end in (("gold", "gold_start/mean_gold_score", "gold_end/mean_gold_score"),
                              ("sampled gold", "gold_sampled_start/mean_gold_score",
                               "gold_sampled_end/mean_gold_score"),
                              ("rm score", "rm_score_mean_start", "rm_score_mean_end"),
                              ("KL", "kl_start", "kl_end")):
        if start in summary and end in summary:
            parts.append(f"{label} {summary[start]:.3f} → {summary[end]:.3f}")
    return "ppo: " + ", ".join(parts)
