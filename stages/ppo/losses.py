"""The pure math of the ppo stage: response masks, masked statistics, KL estimators, per-token
rewards, GAE, the clipped policy and value losses, entropy, log-probs and KL-coefficient
controllers.

Every function takes and returns tensors (torch only, no models), so the whole PPO update can be
checked by hand in unit tests. Shapes: B = responses in the batch, T = response tokens (the prompt
is not included), V = vocabulary size.

Masks are 0/1 tensors of shape (B, T) whose valid tokens form a prefix of each row: the response
up to and including its first EOS (see `response_mask_after_eos`). Every row has at least one valid
token, because a response holds at least one sampled token.

Half precision: at masked positions log-probs are those of padding tokens and can be far apart, so
a log-ratio is masked *before* it is exponentiated (`masked_log_ratio`): exp of a large log-ratio is
inf in bf16 or fp16, and multiplying it by a 0 of the mask afterwards gives NaN (and NaN gradients).

Conventions follow InstructGPT (Ouyang et al. 2022) and "The N+ Implementation Details of RLHF with
PPO" (Huang et al. 2024); where this module differs from the latter, the docstring says so.
"""

from typing import Callable

import torch

# Added to the variance before whitening so that a constant batch does not divide by zero.
WHITEN_EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# Response masks


def response_mask_after_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Mask of the tokens of each response: 1 up to and including the first EOS, 0 after it.

    response_ids: (B, T) sampled token ids. Returns a (B, T) int64 mask (the dtype of an attention
    mask, so it can be concatenated with the prompt's). A row without EOS is all 1: the response is
    the whole sampled length. Whatever generation wrote after the first EOS (more EOS or pad tokens,
    even when pad == eos) is masked, so no pad id is needed.
    """
    is_eos = (response_ids == eos_token_id).long()  # (B, T)
    eos_strictly_before = is_eos.cumsum(dim=1) - is_eos  # (B, T) EOS count before each position
    return (eos_strictly_before == 0).long()


def ended_with_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Whether each response emitted EOS within its sampled length: (B, T) ids -> (B,) bool.

    Responses that did not end get the fixed low reward of the EOS trick and lower the EOS rate.
    """
    return (response_ids == eos_token_id).any(dim=1)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last valid token of each row: (B, T) prefix mask -> (B,) int64."""
    lengths = mask.long().sum(dim=1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError("every response needs at least one valid token; a mask row is all zero")
    return lengths - 1


# ---------------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1.

    x, mask: same shape, e.g. (B, T). dim=None averages over everything (0-dim result); an integer
    dim averages along it, e.g. dim=1 gives (B,). An empty mask gives 0 rather than NaN.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all masked positions (0-dim).

    Unbiased (Bessel's n / (n - 1) correction) by default, as the N+ implementation whitens; that
    needs at least two valid positions.
    """
    centred = x - masked_mean(x, mask)
    variance = masked_mean(centred.pow(2), mask)
    if not unbiased:
        return variance
    count = mask.sum()
    if count < 2:
        raise ValueError(
            f"unbiased masked variance needs at least 2 valid positions, got {int(count)}"
        )
    return variance * count / (count - 1)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalize x to unit variance over the masked positions of the whole batch: (B, T) -> (B, T).

    shift_mean=True also centres it on 0 (used for advantages). shift_mean=False keeps the original
    mean (used for rewards, so whitening does not turn every reward negative or positive). The
    variance is the unbiased one, as in the N+ implementation; masked positions come out as 0.

    When the batch is split across processes, pass `sum_over_processes` (a function returning the
    element-wise sum of a tensor over every process, e.g. `lambda t: accelerator.reduce(t, "sum")`):
    the mean and variance are then those of all processes' valid positions together, so every
    process whitens with the same statistics, as if the whole batch were on one.
    """
    if sum_over_processes is None:
        mean, variance = masked_mean(x, mask), masked_var(x, mask)
    else:
        mean, variance = _global_masked_mean_var(x, mask, sum_over_processes)
    whitened = (x - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def _global_masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, sum_over_processes: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of x over the valid positions of every process (0-dim each).

    Two passes, as `masked_var` does on one process: the global mean first, then the summed squared
    deviations from it, which stays accurate where a sum-of-squares shortcut would cancel.
    """
    mask = mask.to(x.dtype)
    total, count = sum_over_processes(torch.stack([(x * mask).sum(), mask.sum()]))
    if count < 2:
        raise ValueError(
            f"unbiased masked variance needs at least 2 valid positions, got {int(count)}"
        )
    mean = total / count
    squared_deviations = sum_over_processes(((x - mean).pow(2) * mask).sum())
    return mean, squared_deviations / (count - 1)


# ---------------------------------------------------------------------------------------------
# KL and rewards


def masked_log_ratio(logp: torch.Tensor, other_logp: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """log p − log p_other on valid tokens, exactly 0 on masked ones: (B, T) x3 -> (B, T).

    `torch.where`, not a product with the mask: an inf or NaN at a masked position stays out of
    both the value and the gradient.
    """
    return torch.where(mask.bool(), logp - other_logp, torch.zeros_like(logp))


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k1 KL estimate log π − log π_ref: (B, T) x3 -> (B, T), 0 where masked.

    Unbiased for KL(π ‖ π_ref) on tokens sampled from π, but single tokens can be negative. This is
    the penalty of InstructGPT eq. 2.
    """
    return masked_log_ratio(logp, ref_logp, mask)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 KL estimate (r − 1) − log r with r = π_ref / π: (B, T) x3 -> (B, T), 0 where
    masked.

    Schulman's estimator: unbiased for KL(π ‖ π_ref) on tokens sampled from π, never negative, and
    lower variance than k1 when the two policies are close.
    """
    log_ratio = masked_log_ratio(ref_logp, logp, mask)
    return torch.expm1(log_ratio) - log_ratio


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """The reward PPO maximizes, spread over tokens: (B,), (B, T), (B, T) -> (B, T).

    Every valid token gets −kl_coef · kl (the KL penalty against the reference); the last valid
    token of each row also gets the reward-model score of the whole response. Masked positions
    are 0.
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)  # (B, T)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_valid_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation: (B, T) rewards, values, mask -> advantages, returns (B, T).

    The episode ends at the last valid token: the value after it is 0 (nothing to bootstrap), and
    masked positions contribute nothing and get advantage 0. returns = advantages + values, the
    regression target of the value model (0 at masked positions).
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # masked positions: reward 0, value 0
    num_tokens = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,) advantage of the following token
    for t in reversed(range(num_tokens)):
        # values[:, t + 1] is 0 after the last valid token because of the prefix mask.
        next_value = values[:, t + 1] if t + 1 < num_tokens else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------
# Clipped losses


def _pessimistic_mean(
    unclipped: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean of the larger of two per-token losses, and the share where the clipped one won.

    Both PPO losses take the pessimistic (larger) of the clipped and unclipped objective, so a
    token whose update already went past the clip range stops pushing further.
    """
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(unclipped.dtype), mask)
    return loss, clip_fraction.detach()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss: (B, T) log-probs now and at rollout, advantages, mask -> 0-dim.

    loss = masked mean of max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε)), ratio = π / π_old.
    stats (detached 0-dim tensors):
      clip_fraction — share of valid tokens where the clipped term was the larger one;
      approx_kl — k3 estimate of KL(π_old ‖ π) on the sampled tokens (never negative; the N+ code
        logs k2 = ½(log π − log π_old)², which agrees with it to second order).
    """
    ratio = torch.exp(masked_log_ratio(logp, old_logp, mask))  # (B, T), 1 where masked
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss, clip_fraction = _pessimistic_mean(unclipped, clipped, mask)
    approx_kl = masked_mean(kl_k3(old_logp, logp, mask), mask).detach()
    return loss, {"clip_fraction": clip_fraction, "approx_kl": approx_kl}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: (B, T) values now and at rollout, returns, mask -> 0-dim loss.

    loss = ½ · masked mean of max((V − R)², (V_clipped − R)²), where V_clipped stays within
    ±clip_eps of the rollout value. stats: value_clip_fraction (detached 0-dim), the share of valid
    tokens where the clipped error was the larger one.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns).pow(2)
    clipped = (clipped_values - returns).pow(2)
    loss, clip_fraction = _pessimistic_mean(unclipped, clipped, mask)
    return 0.5 * loss, {"value_clip_fraction": clip_fraction}


# ---------------------------------------------------------------------------------------------
# Logits


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of the given tokens: (B, T, V) logits, (B, T) ids -> (B, T).

    The logits are divided by the sampling temperature first; recomputing log-probs with a different
    scaling than sampling used is the usual cause of negative KL. Half-precision logits are computed
    in float32, so bf16 does not lose the small differences the PPO ratio depends on.
    """
    scaled = _at_least_float32(logits) / temperature  # (B, T, V)
    chosen = scaled.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return chosen - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(
    logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean entropy of the next-token distribution over valid tokens: (B, T, V), (B, T) -> 0-dim.

    With temperature, the entropy of the distribution sampling actually drew from.
    """
    scaled = _at_least_float32(logits) / temperature  # (B, T, V)
    probs = torch.softmax(scaled, dim=-1)
    entropy = torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)  # (B, T)
    return masked_mean(entropy, mask)


# ---------------------------------------------------------------------------------------------
# Diagnostics


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 − Var(returns − values) / Var(returns) over valid tokens: (B, T) x3 -> 0-dim.

    1 means the value model predicts the returns exactly, 0 no better than their mean, below 0
    worse than that. NaN when the returns are constant over the batch.
    """
    residual_var = masked_var(returns - values, mask)
    return (1.0 - residual_var / masked_var(returns, mask)).detach()


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers


class KLController:
    """The KL coefficient β of the per-token penalty, and the state a resumed run must restore."""

    def __init__(self, init_kl_coef: float):
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust β after n_steps episodes whose mean KL per sequence was current_kl."""

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["kl_coef"])


class FixedKLController(KLController):
    """β stays at its initial value (InstructGPT)."""


class AdaptiveKLController(KLController):
    """Moves β toward a target KL (Ziegler et al. 2019).

    error = clip(current_kl / target − 1, −0.2, 0.2); β ← β · (1 + error · n_steps / horizon).
    So β grows when the policy drifts further from the reference than the target and shrinks when
    it stays closer, by at most 20% per horizon episodes.
    """

    MAX_PROPORTIONAL_ERROR = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        limit = self.MAX_PROPORTIONAL_ERROR
        error = min(max(current_kl / self.target - 1.0, -limit), limit)
        self.value *= 1.0 + error * n_steps / self.horizon
