"""PPO rollouts: sample answers to a batch of prompts and turn them into experience for the update.

    prompt ids ─► sample (KV cache; temperature, top-k/top-p; stop at EOS; left-padded prompts)
               ─► reward-model score at each answer's EOS (a fixed penalty when it never ends)
               ─► policy log-probs (and a value head's values), reference log-probs, values,
                   one forward pass each
               ─► per-token KL penalty + score ─► GAE advantages (whitened) and returns

Shapes: B episodes, P prompt width (left-padded), T response width, L = P + T, V vocabulary,
H hidden size. Everything after a response's first EOS is masked out of every loss.

The policy's log-probs of the sampled tokens (the "old" log-probs of the PPO ratio) come from a
full forward pass over the finished sequences, the very computation the update repeats, not from
the logits `generate` produced with its KV cache: in bf16 the two differ in the last bits, which
would make the first ratio differ from 1 before any update. With a value head that same pass gives
the values. Every forward pass gives position ids from the attention mask, which is how `generate`
numbers left-padded prompts; a mismatch there, or in the temperature, is what shows up as negative
KL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable

import torch

from pipeline.data.packing import left_pad
from pipeline.sharding import gathered
from stages.ppo.config import Config
from stages.ppo.losses import (ended_with_eos, entropy_from_logits, gae, kl_k1, kl_k3,
                               last_valid_index, logprobs_from_logits, masked_whiten,
                               per_token_rewards, response_mask_after_eos)
from stages.ppo.models import Models, critic_values, response_logits
from stages.ppo.sampling import episode_sampler
from stages.ppo.threads import side_by_side

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


@dataclass
class Experience:
    """One batch of episodes, everything the PPO update needs. Rows are episodes."""

    sequences: torch.Tensor       # (B, L) left-padded prompt, then the response (pad after EOS)
    attention_mask: torch.Tensor  # (B, L) 1 on prompt tokens and on response tokens through EOS
    response_mask: torch.Tensor   # (B, T) 1 on response tokens through the first EOS
    logprobs: torch.Tensor        # (B, T) policy log-probs of the sampled tokens at rollout
    ref_logprobs: torch.Tensor    # (B, T) the reference's log-probs of the same tokens
    values: torch.Tensor          # (B, T) value of the state before each response token
    rm_scores: torch.Tensor       # (B,) reward-model score at the EOS (or at the last token)
    scores: torch.Tensor          # (B,) the score rewarded: rm_scores, or the missing-EOS penalty
    ended: torch.Tensor           # (B,) bool: the response emitted EOS
    kl: torch.Tensor              # (B, T) per-token KL estimate vs the reference (0 when masked)
    advantages: torch.Tensor      # (B, T) whitened GAE advantages
    returns: torch.Tensor         # (B, T) value targets
    entropy: torch.Tensor         # 0-dim mean entropy of the sampling distribution

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, -self.response_width:]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def rows(self, index: torch.Tensor) -> "Experience":
        """The episodes at `index` (a minibatch); 0-dim fields are kept as they are."""
        return Experience(**{f.name: getattr(self, f.name)[index] if getattr(self, f.name).dim()
                             else getattr(self, f.name) for f in fields(self)})


@torch.no_grad()
def sample(policy, prompts: list[list[int]], keys: torch.Tensor, config: Config, eos_token_id: int,
           pad_token_id: int):
    """Sample one answer per prompt with the KV cache, each drawn with its episode's key
    (`stages.ppo.sampling`).

    Returns (sequences (B, L), attention_mask (B, L), response_mask (B, T)).
    """
    generation = config.generation
    device = next(policy.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
    sampler = episode_sampler(keys.to(device), prompt_ids.shape[1], generation.temperature, generation.top_k,
                              generation.top_p)
    # Greedy decoding over the sampler's noisy scores is sampling (the Gumbel-max trick).
    out = policy.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, logits_processor=sampler,
        max_new_tokens=generation.max_new_tokens, min_new_tokens=generation.min_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True)
    responses = out[:, prompt_ids.shape[1]:]  # (B, T)
    response_mask = response_mask_after_eos(responses, eos_token_id)
    # What generation wrote after a row's EOS is padding, whatever id it used.
    responses = torch.where(response_mask.bool(), responses, pad_token_id)
    sequences = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return sequences, attention_mask, response_mask


@torch.no_grad()
def make_experience(models: Models, prompts: list[list[int]], keys: torch.Tensor, config: Config,
                    kl_coef: float, *,
                    eos_token_id: int, pad_token_id: int,
                    sum_over_processes: Callable[[torch.Tensor], torch.Tensor],
                    timings: dict[str, float], workers: int = 1) -> Experience:
    """Roll out `prompts` (this process's share of the batch; `keys` are their episodes' sampling
    keys) and compute advantages and returns.

    `sum_over_processes` sums a tensor over every process, so advantages (and rewards, when
    whitened) are normalized with the statistics of the whole batch. The policy, reference, value
    and reward passes run on up to `workers` threads (`side_by_side`). `timings` receives the
    seconds spent generating (`time_generate`) and in those passes (`time_score`).
    """
    started = time.perf_counter()
    with gathered(models.policy):  # sharded, processes' answers end at different lengths
        sequences, attention_mask, mask = sample(models.policy, prompts, keys, config,
                                                 eos_token_id, pad_token_id)
    timings["time_generate"] = time.perf_counter() - started

    started = time.perf_counter()
    width = mask.shape[1]
    responses = sequences[:, -width:]
    temperature = config.generation.temperature
    # The reward model reads the whole answer at its EOS (or its last token if it never ended).
    eos_positions = sequences.shape[1] - width + last_valid_index(mask)

    def policy_pass():
        """(old log-probs, entropy, values from the value head or None), as the update computes."""
        logits, hidden = response_logits(models.policy, sequences, attention_mask, width,
                                         with_hidden=models.value_head is not None,
                                         packed=models.packed)
        values = models.value_head(hidden) if models.value_head is not None else None
        return (logprobs_from_logits(logits, responses, temperature),
                entropy_from_logits(logits, mask, temperature), values)

    # With LoRA the reference pass (adapter disabled) goes through the policy's module, so the
    # two must not overlap.
    (logprobs, entropy, head_values), ref_logprobs, model_values, rm_scores = side_by_side(
        policy_pass,
        lambda: logprobs_from_logits(models.reference_logits(sequences, attention_mask, width),
                                     responses, temperature),
        lambda: (None if models.value_model is None else
                 critic_values(models.value_model, sequences, attention_mask, width)),
        lambda: models.reward_model(sequences, attention_mask)[torch.arange(len(prompts)),
                                                               eos_positions],
        workers=1 if models.reference is None else workers)
    values = head_values if head_values is not None else model_values
    ended = ended_with_eos(responses, eos_token_id)
    penalty = config.reward.missing_eos_penalty
    scores = rm_scores if penalty is None else torch.where(ended, rm_scores,
                                                           torch.full_like(rm_scores, penalty))
    kl = KL_ESTIMATORS[config.kl.estimator](logprobs, ref_logprobs, mask)
    rewards = per_token_rewards(scores, kl, mask, kl_coef)
    if config.ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False,
                                sum_over_processes=sum_over_processes)
    advantages, returns = gae(rewards, values, mask, config.ppo.gamma, config.ppo.lam)
    advantages = masked_whiten(advantages, mask, sum_over_processes=sum_over_processes)
    timings["time_score"] = time.perf_counter() - started
    return Experience(sequences=sequences, attention_mask=attention_mask, response_mask=mask,
                      logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                      rm_scores=rm_scores, scores=scores, ended=ended, kl=kl,
                      advantages=advantages, returns=returns, entropy=entropy)
