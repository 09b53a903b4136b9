"""K-wise ranking loss for the reward stage, and the held-out ranking metrics.

InstructGPT (Ouyang et al. 2022, §3.5) shows labelers K answers per prompt (4 ≤ K ≤ 9) and trains
the reward model on all K·(K−1)/2 pairs of one prompt as a single batch element, each answer scored
once. This module works on those scores only; no model is involved.

Encoding of a batch: answers of all prompts are flattened into N rows.
  scores    (N,) float — the reward model's score of each answer
  group_ids (N,) int   — which prompt the answer belongs to (any integers; equal = same prompt)
  ranks     (N,) int   — rank position within its prompt, 0 = best; equal ranks are ties
A labeled ranking such as [2, [0, 3], 1] (answer indices best → worst, a list = tied answers)
becomes rank positions with `rank_positions`; lists of those become tensors with `encode_groups`.
"""

import torch
import torch.nn.functional as F

RankingItem = int | list[int]


def rank_positions(ranking: list[RankingItem]) -> list[int]:
    """Per-answer rank positions from a ranking of answer indices, best first.

    An element may be a list of tied indices: [2, [0, 3], 1] -> [1, 2, 0, 1] (answer 2 is best,
    answers 0 and 3 tie second, answer 1 is last). Tied answers share one position and the next
    position follows directly. Raises ValueError unless the indices are exactly 0..K−1, each once;
    the data loader adds the file and line.
    """
    positions: dict[int, int] = {}
    for position, item in enumerate(ranking):
        tied = item if isinstance(item, list) else [item]
        if not tied:
            raise ValueError(f"ranking {ranking} has an empty tie group at position {position}")
        for answer in tied:
            if answer in positions:
                raise ValueError(f"ranking {ranking} lists answer {answer} twice")
            positions[answer] = position
    if sorted(positions) != list(range(len(positions))):
        raise ValueError(
            f"ranking {ranking} must name each answer index 0..{len(positions) - 1} exactly once"
        )
    return [positions[answer] for answer in range(len(positions))]


def encode_groups(rank_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-prompt rank positions into the batch encoding: -> group_ids (N,), ranks (N,).

    Prompt i gets group id i: [[0, 1], [1, 0, 1]] -> group_ids [0, 0, 1, 1, 1],
    ranks [0, 1, 1, 0, 1].
    """
    group_ids = [group for group, ranks in enumerate(rank_lists) for _ in ranks]
    flat_ranks = [rank for ranks in rank_lists for rank in ranks]
    return torch.tensor(group_ids, dtype=torch.long), torch.tensor(flat_ranks, dtype=torch.long)


def ranking_pairs(
    group_ids: torch.Tensor, ranks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All strictly ordered answer pairs within each prompt: (N,), (N,) -> three (P,) int64 tensors.

    Returns (winner_idx, loser_idx, pair_group): indices into the N answers, the winner having the
    better (smaller) rank, and the group id of each pair. Tied answers form no pair. Pairs come in
    order of winner index, then loser index.
    """
    same_group = group_ids.unsqueeze(1) == group_ids.unsqueeze(0)  # (N, N)
    ranked_above = ranks.unsqueeze(1) < ranks.unsqueeze(0)  # (N, N): row beats column
    winner_idx, loser_idx = torch.nonzero(same_group & ranked_above, as_tuple=True)
    return winner_idx, loser_idx, group_ids[winner_idx]


def pair_correctness(score_gaps: torch.Tensor) -> torch.Tensor:
    """Credit per pair from winner − loser score gaps (P,) -> (P,): 1 right, ½ tied score, 0 wrong.

    A tied score earns half, so a model that scores everything alike sits at chance (0.5), not at 0.
    """
    return (score_gaps > 0).to(score_gaps.dtype) + 0.5 * (score_gaps == 0).to(score_gaps.dtype)


def kwise_ranking_loss(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    ranks: torch.Tensor,
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InstructGPT's K-wise ranking loss: (N,) scores, group ids, ranks -> 0-dim loss, stats.

    Per prompt: −mean over its pairs of log σ(r_winner − r_loser − margin). The batch loss is the
    mean over prompts, so each prompt weighs the same whatever its K. Prompts whose answers are all
    tied have no pair and contribute nothing. center_coef > 0 adds center_coef · mean(scores²) over
    all N answers, which keeps scores near 0 (the ranking loss alone only fixes differences).
    stats (detached): pairwise_accuracy (pair-weighted, `pair_correctness`; NaN without pairs)
    and n_pairs.
    """
    if scores.dim() != 1 or not (scores.shape == group_ids.shape == ranks.shape):
        raise ValueError(
            f"scores, group_ids and ranks must be (N,) tensors of one length, got "
            f"{tuple(scores.shape)}, {tuple(group_ids.shape)}, {tuple(ranks.shape)}"
        )
    winner_idx, loser_idx, pair_group = ranking_pairs(group_ids, ranks)
    score_gaps = scores[winner_idx] - scores[loser_idx]  # (P,)
    pair_losses = -F.logsigmoid(score_gaps - margin)  # (P,)

    # Renumber the groups that have pairs as 0..G−1 to average per prompt.
    groups_with_pairs, dense_group = torch.unique(pair_group, return_inverse=True)  # (G,), (P,)
    n_groups = groups_with_pairs.numel()
    loss_sum = scores.new_zeros(n_groups).index_add(0, dense_group, pair_losses)  # (G,)
    pair_count = torch.bincount(dense_group, minlength=n_groups).to(scores.dtype)  # (G,)
    # Summing an empty tensor keeps the loss attached to the graph when no prompt has a pair.
    loss = (loss_sum / pair_count).mean() if n_groups else pair_losses.sum()
    if center_coef:
        loss = loss + center_coef * scores.pow(2).mean()

    stats = {
        "pairwise_accuracy": pair_correctness(score_gaps.detach()).mean(),
        "n_pairs": torch.tensor(winner_idx.numel()),
    }
    return loss, stats


def _kendall_tau_b(xs: list[float], ys: list[float]) -> float | None:
    """Kendall's tau-b of two equally long sequences; None when either is constant (undefined).

    tau-b = (concordant − discordant) / sqrt((n0 − ties_x) · (n0 − ties_y)), n0 = all pairs.
    """
    concordant = discordant = ties_x = ties_y = n0 = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            n0 += 1
            direction = (xs[i] - xs[j]) * (ys[i] - ys[j])
            concordant += direction > 0
            discordant += direction < 0
            ties_x += xs[i] == xs[j]
            ties_y += ys[i] == ys[j]
    denominator = ((n0 - ties_x) * (n0 - ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


def ranking_metrics(score_lists: list[list[float]], rank_lists: list[list[int]]) -> dict:
    """Held-out metrics of a reward model on ranked answers, from plain per-prompt lists.

    score_lists[i][k] is the score of answer k of prompt i; rank_lists[i][k] its rank position
    (0 = best, ties equal). Returns:
      pairwise_accuracy  — share of strictly ranked pairs scored in order (`pair_correctness`)
      accuracy_by_gap    — {rank gap: accuracy}, gap = loser position − winner position
      mean_score_by_rank — {rank position: mean score of the answers there}
      kendall_tau        — mean over prompts of tau-b between scores and the labeled order
                           (prompts with constant scores or all-tied labels are left out)
      n_prompts, n_pairs
    Accuracies and tau are NaN when nothing defines them.
    """
    if len(score_lists) != len(rank_lists):
        raise ValueError(f"{len(score_lists)} score lists but {len(rank_lists)} rank lists")
    for prompt, (prompt_scores, prompt_ranks) in enumerate(zip(score_lists, rank_lists)):
        if len(prompt_scores) != len(prompt_ranks):
            raise ValueError(
                f"prompt {prompt}: {len(prompt_scores)} scores but {len(prompt_ranks)} ranks"
            )

    scores = torch.tensor([s for prompt in score_lists for s in prompt], dtype=torch.float64)
    group_ids, ranks = encode_groups(rank_lists)
    winner_idx, loser_idx, _ = ranking_pairs(group_ids, ranks)
    correct = pair_correctness(scores[winner_idx] - scores[loser_idx])  # (P,)
    rank_gaps = ranks[loser_idx] - ranks[winner_idx]  # (P,)

    # Scores are compared against −rank, since rank 0 is the best answer.
    taus = [
        _kendall_tau_b(prompt_scores, [-rank for rank in prompt_ranks])
        for prompt_scores, prompt_ranks in zip(score_lists, rank_lists)
    ]
    defined_taus = [tau for tau in taus if tau is not None]
    return {
        "pairwise_accuracy": correct.mean().item() if correct.numel() else float("nan"),
        "accuracy_by_gap": {
            int(gap): correct[rank_gaps == gap].mean().item() for gap in rank_gaps.unique()
        },
        "mean_score_by_rank": {
            int(rank): scores[ranks == rank].mean().item() for rank in ranks.unique()
        },
        "kendall_tau": sum(defined_taus) / len(defined_taus) if defined_taus else float("nan"),
        "n_prompts": len(score_lists),
        "n_pairs": int(winner_idx.numel()),
    }
