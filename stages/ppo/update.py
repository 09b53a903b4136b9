"""One PPO step: a rollout of the batch, then `ppo.epochs` passes of clipped policy and value
updates over `ppo.minibatches` minibatches (+ the PPO-ptx pretraining loss, + the EMA of the
policy), then the KL controller.

`PPOTrainer` holds the models, optimizers, schedulers, KL controller and EMA; the stage's loop and
`benchmarks/ppo_throughput.py` both drive it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.loop import step_indices, warmup_cosine
from pipeline.sharding import is_sharded, prepare
from stages.ppo.config import Config
from stages.ppo.experience import Experience, make_experience
from stages.ppo.losses import (AdaptiveKLController, FixedKLController, KLController,
                               explained_variance, logprobs_from_logits, policy_loss, value_loss)
from stages.ppo.models import Models, PolicyEMA, critic_values, response_logits, trainable
from stages.ppo.sampling import episode_keys
from stages.ppo.threads import side_by_side


def build_optimizers(config: Config, models: Models):
    """AdamW for the policy (with the value head when shared) and for the value model; each with
    the warmup + cosine schedule, stepped once per PPO step."""
    train = config.train
    value_lr = config.value.lr or train.lr

    def adamw(groups):
        # Fused on a CPU too: one kernel per tensor, in place. The foreach kernels are slower on a
        # CPU and hold a temporary the size of all parameters at every step (measured for a
        # 135M-parameter model: 0.07 s and no temporary fused, 0.8 s and +515 MB foreach).
        return torch.optim.AdamW(groups, weight_decay=train.weight_decay, betas=(0.9, 0.95),
                                 eps=1e-5, fused=True)

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


def step_seed(seed: int, step: int, process: int) -> int:
    """The RNG seed of one process's rollout at one step: resume needs no RNG from the past."""
    return int(np.random.SeedSequence([seed, step, process]).generate_state(1)[0])


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
        optimizers, self.schedulers = build_optimizers(config, models)
        # Distributed wrappers for the update (DDP; a sharded model is its own); rollouts use the
        # modules in `models`.
        self.policy, self.critic, *prepared = prepare(accelerator, models.policy, models.critic,
                                                      *optimizers.values())
        self.optimizers = dict(zip(optimizers, prepared))
        # The module each optimizer trains, which a sharded resume state needs.
        self.optimizer_modules = (
            {"policy": nn.ModuleList([models.policy, models.value_head])}
            if models.value_head is not None else
            {"policy": models.policy, "value": models.value_model})
        for frozen_model in (models.reference, models.reward_model):
            if frozen_model is not None:
                frozen_model.to(accelerator.device)
        self.ema = PolicyEMA(models.policy, config.ema.decay) if config.ema.decay > 0 else None
        # Threads for passes side by side (each with one intra-op thread); 1 = the usual way.
        # Not with sharded models: their passes make collective calls, which threads could issue
        # in a different order on each process.
        on_cpu = accelerator.device.type == "cpu"
        side_by_side_ok = config.ppo.side_by_side and on_cpu and not is_sharded(models.policy)
        self.workers = torch.get_num_threads() if side_by_side_ok else 1

    def state(self) -> dict:
        """The keyword arguments of `StageRun.save_state` (which adds the RNG)."""
        models = {"model": self.models.policy, "value": self.models.critic}
        if self.ema is not None:
            models["ema"] = self.ema
        return {"models": models, "optimizers": self.optimizers, "schedulers": self.schedulers,
                "optimizer_modules": self.optimizer_modules,
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
                                             batch.response_width, with_hidden=True,
                                             packed=self.models.packed)
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
                                        batch.response_width, packed=self.models.packed)
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
