"""PPO rollouts: sample answers to a batch of prompts and turn them into experience for the update.

    prompt ids ─► sample (KV cache; temperature, top-k/top-p; stop at EOS; left-padded prompts)
               ─► reward-model score at each answer's EOS (a fixed penalty when it never ends)
               ─► reference log-probs and values, one forward pass each
               ─► per-token KL penalty + score ─► GAE advantages (whitened) and returns

Shapes: B episodes, P prompt width (left-padded), T response width, L = P + T, V vocabulary,
H hidden size. Everything after a response's first EOS is masked out of every loss.

The policy's log-probs of the sampled tokens are taken from the logits `generate` already returned
(scaled by the sampling temperature as sampling was), not from a second forward pass. Every forward
pass gives position ids from the attention mask, which is how `generate` numbers left-padded
prompts; a mismatch there, or in the temperature, is what shows up as negative KL.

The reward and value models are scalar-head sequence classifiers (`AutoModelForSequenceClassification`
with one label) read at every position (`TokenScorer`), so the score is taken at the EOS this
module found, never where the classifier's own pad-token search would look (pad can equal EOS).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import torch
from torch import nn

from pipeline.tokenizer import left_pad
from stages.ppo.losses import (ended_with_eos, entropy_from_logits, gae, kl_k1, kl_k3,
                               last_valid_index, logprobs_from_logits, masked_whiten,
                               per_token_rewards, response_mask_after_eos)
from stages.ppo.sampling import episode_sampler

if TYPE_CHECKING:
    from stages.ppo.trainer import Config

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}
T = TypeVar("T")


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: (B, L) 0/1 mask -> (B, L), the first real token at 0."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_logits(causal_lm, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    response_width: int, with_hidden: bool = False):
    """Logits that predicted each response token, and optionally the last hidden state there.

    sequences, attention_mask: (B, L) with the response in the last T = response_width columns.
    Returns ((B, T, V) logits, (B, T, H) hidden states or None): position P − 1 + t predicts token t.
    Only the last T + 1 positions go through the output layer.
    """
    out = causal_lm(input_ids=sequences, attention_mask=attention_mask,
                    position_ids=positions(attention_mask), logits_to_keep=response_width + 1,
                    output_hidden_states=with_hidden, use_cache=False)
    hidden = out.hidden_states[-1][:, -(response_width + 1):-1] if with_hidden else None
    return out.logits[:, :-1], hidden


class SafetensorsModule(nn.Module):
    """A module that a resume state stores as one safetensors file of its state dict.

    `StageRun.save_state` saves every model with `save_pretrained(directory, state_dict=...)`;
    these modules load back with `load_pretrained(directory)`, exactly, whatever classes they wrap.
    """

    WEIGHTS_FILE = "weights.safetensors"

    def save_pretrained(self, directory: Path, state_dict: dict | None = None) -> None:
        from safetensors.torch import save_file
        tensors = self.state_dict() if state_dict is None else state_dict
        Path(directory).mkdir(parents=True, exist_ok=True)
        # Copies: safetensors refuses tensors that share memory (tied embeddings).
        save_file({name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()},
                  str(Path(directory) / self.WEIGHTS_FILE))

    def load_pretrained(self, directory: Path) -> None:
        from safetensors.torch import load_file
        self.load_state_dict(load_file(str(Path(directory) / self.WEIGHTS_FILE)))


class TokenScorer(SafetensorsModule):
    """A scalar-head sequence classifier read at every position: (B, L) ids -> (B, L) float32.

    Serves the frozen reward model (read at the EOS) and the trainable value model (read at every
    state before a response token). The head keeps the bias the reward stage's normalization adds.
    """

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone = getattr(self.classifier, self.classifier.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=positions(attention_mask), use_cache=False).last_hidden_state
        return self.classifier.score(hidden).squeeze(-1).float()


class ValueHead(SafetensorsModule):
    """The value model of `value.shared_backbone`: a linear map of the policy's last hidden state.

    (B, T, H) -> (B, T). Zero-initialized, so every value starts at 0.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1).float()


@dataclass
class Models:
    """Everything a rollout and an update touch (unwrapped from any distributed wrapper).

    Exactly one of `value_model` (a separate critic) and `value_head` (on the policy) is set;
    `reference` is None with LoRA, where the policy with its adapter disabled is the reference.
    """

    policy: nn.Module
    reference: nn.Module | None
    reward_model: TokenScorer
    value_model: TokenScorer | None
    value_head: ValueHead | None

    @property
    def critic(self) -> SafetensorsModule:
        """Whichever of the value model and the value head is trained."""
        return self.value_head if self.value_head is not None else self.value_model

    def reference_logits(self, sequences, attention_mask, response_width) -> torch.Tensor:
        if self.reference is not None:
            return response_logits(self.reference, sequences, attention_mask, response_width)[0]
        with self.policy.disable_adapter():
            return response_logits(self.policy, sequences, attention_mask, response_width)[0]


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


def side_by_side(*tasks: Callable[[], T], workers: int) -> list[T]:
    """Run independent model passes at the same time, up to `workers` threads; their results.

    Meant for a CPU whose intra-op threads are set to 1 (see `PPOTrainer`): small models split
    over several intra-op threads synchronize at every matrix multiply, which a CPU shared with
    other work turns into waiting (measured here: 5-20x slower at 2 threads under load), while
    passes through different models, one thread each, keep the cores busy without it. Each pass
    computes exactly what it would alone, so results do not depend on the scheduling. The
    workers inherit the caller's grad mode and CPU autocast (both are per thread).
    """
    if workers < 2 or len(tasks) < 2:
        return [task() for task in tasks]
    grad_enabled = torch.is_grad_enabled()
    autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))

    def in_callers_mode(task: Callable[[], T]) -> T:
        with torch.set_grad_enabled(grad_enabled), \
                torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
            return task()

    with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        futures = [pool.submit(in_callers_mode, task) for task in tasks]
        return [future.result() for future in futures]


@torch.no_grad()
def sample(policy, prompts: list[list[int]], keys: torch.Tensor, config: Config, eos_token_id: int,
           pad_token_id: int):
    """Sample one answer per prompt with the KV cache, each drawn with its episode's key
    (`stages.ppo.sampling`).

    Returns (sequences (B, L), attention_mask (B, L), response_mask (B, T), logits (B, T, V)): the
    raw logits the sampler drew each token from (before temperature and top-k/top-p).
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
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
        output_logits=True, return_dict_in_generate=True)
    responses = out.sequences[:, prompt_ids.shape[1]:]  # (B, T)
    response_mask = response_mask_after_eos(responses, eos_token_id)
    # What generation wrote after a row's EOS is padding, whatever id it used.
    responses = torch.where(response_mask.bool(), responses, pad_token_id)
    sequences = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return sequences, attention_mask, response_mask, torch.stack(out.logits, dim=1)


@torch.no_grad()
def make_experience(models: Models, prompts: list[list[int]], keys: torch.Tensor, config: Config,
                    kl_coef: float, *,
                    eos_token_id: int, pad_token_id: int,
                    sum_over_processes: Callable[[torch.Tensor], torch.Tensor],
                    timings: dict[str, float], workers: int = 1) -> Experience:
    """Roll out `prompts` (this process's share of the batch; `keys` are their episodes' sampling
    keys) and compute advantages and returns.

    `sum_over_processes` sums a tensor over every process, so advantages (and rewards, when
    whitened) are normalized with the statistics of the whole batch. The reference, value and
    reward passes run on up to `workers` threads (`side_by_side`). `timings` receives the seconds
    spent generating (`time_generate`) and scoring (`time_score`).
    """
    import time

    started = time.perf_counter()
    sequences, attention_mask, mask, logits = sample(models.policy, prompts, keys, config,
                                                     eos_token_id, pad_token_id)
    width = mask.shape[1]
    responses = sequences[:, -width:]
    temperature = config.generation.temperature
    logprobs = logprobs_from_logits(logits, responses, temperature)
    entropy = entropy_from_logits(logits, mask, temperature)
    del logits
    timings["time_generate"] = time.perf_counter() - started

    started = time.perf_counter()
    # The reward model reads the whole answer at its EOS (or its last token if it never ended).
    eos_positions = sequences.shape[1] - width + last_valid_index(mask)
    # With LoRA and a value head, the reference pass (adapter disabled) and the value pass go
    # through the same module, so they must not overlap.
    shares_policy = models.reference is None and models.value_head is not None
    ref_logprobs, values, rm_scores = side_by_side(
        lambda: logprobs_from_logits(models.reference_logits(sequences, attention_mask, width),
                                     responses, temperature),
        lambda: rollout_values(models, sequences, attention_mask, width),
        lambda: models.reward_model(sequences, attention_mask)[torch.arange(len(prompts)),
                                                               eos_positions],
        workers=1 if shares_policy else workers)
    ended = ended_with_eos(responses, eos_token_id)
    penalty = config.reward.missing_eos_penalty
    scores = rm_scores if penalty is None else torch.where(ended, rm_scores,
                                                           torch.full_like(rm_scores, penalty))
    kl = KL_ESTIMATORS[config.kl.estimator](logprobs, ref_logprobs) * mask
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


def rollout_values(models: Models, sequences, attention_mask, response_width: int) -> torch.Tensor:
    """(B, T) values of the states before each response token, from the critic or the value head."""
    if models.value_head is not None:
        _, hidden = response_logits(models.policy, sequences, attention_mask, response_width,
                                    with_hidden=True)
        return models.value_head(hidden)
    return critic_values(models.value_model, sequences, attention_mask, response_width)


def critic_values(value_model, sequences, attention_mask, response_width: int) -> torch.Tensor:
    """A separate value model's (B, T) values: its outputs at positions P − 1 … L − 2."""
    return value_model(sequences, attention_mask)[:, -(response_width + 1):-1]
