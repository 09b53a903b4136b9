"""Unit tests of the K-wise ranking loss and ranking metrics, against values computed by hand.

sp(x) below is −log σ(x) = log(1 + e^−x):
  sp(1) = 0.313261687518223, sp(1.5) = 0.201413277982752, sp(2) = 0.126928011042973,
  sp(0.5) = 0.474076984180107, sp(−1) = 1.313261687518223.
"""

import math

import pytest
import torch

from pipeline.ranking import (
    encode_groups,
    kwise_ranking_loss,
    rank_positions,
    ranking_metrics,
    ranking_pairs,
)

SP_1 = 0.313261687518223
SP_1_5 = 0.201413277982752
SP_2 = 0.126928011042973
SP_0_5 = 0.474076984180107
SP_MINUS_1 = 1.313261687518223


def loss_of(scores, group_ids, ranks, **kwargs):
    return kwise_ranking_loss(
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(group_ids),
        torch.tensor(ranks),
        **kwargs,
    )


# --- rank_positions and encode_groups ------------------------------------------------------


def test_rank_positions_with_ties():
    # Answer 2 best, answers 0 and 3 tie second, answer 1 last.
    assert rank_positions([2, [0, 3], 1]) == [1, 2, 0, 1]
    assert rank_positions([0, 1, 2]) == [0, 1, 2]
    assert rank_positions([[1, 0]]) == [0, 0]


@pytest.mark.parametrize("ranking", [[0, 0], [0, 2], [[], 0], [1]])
def test_rank_positions_rejects_bad_rankings(ranking):
    with pytest.raises(ValueError, match="ranking"):
        rank_positions(ranking)


def test_encode_groups():
    group_ids, ranks = encode_groups([[0, 1], [1, 0, 1]])
    assert group_ids.tolist() == [0, 0, 1, 1, 1]
    assert ranks.tolist() == [0, 1, 1, 0, 1]


# --- ranking_pairs --------------------------------------------------------------------------


def test_ranking_pairs_skip_ties_and_stay_in_group():
    # Group 0: answer 1 best, answers 0 and 2 tied behind it -> (1, 0), (1, 2).
    # Group 1: answer 3 beats answer 4 -> (3, 4). No pair crosses groups although 3 (rank 0)
    # would "beat" answers 0 and 2 (rank 1) if groups were ignored.
    group_ids, ranks = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1, 0, 1, 0, 1])
    winners, losers, groups = ranking_pairs(group_ids, ranks)
    assert winners.tolist() == [1, 1, 3]
    assert losers.tolist() == [0, 2, 4]
    assert groups.tolist() == [0, 0, 1]


def test_ranking_pairs_keep_group_ids_as_given():
    winners, losers, groups = ranking_pairs(torch.tensor([9, 4, 9]), torch.tensor([1, 0, 0]))
    assert (winners.tolist(), losers.tolist(), groups.tolist()) == ([2], [0], [9])


# --- kwise_ranking_loss --------------------------------------------------------------------


def test_loss_k2():
    # One pair, gap 1: −log σ(1).
    loss, stats = loss_of([1.0, 0.0], [0, 0], [0, 1])
    assert loss.item() == pytest.approx(SP_1, abs=1e-12)
    assert stats["pairwise_accuracy"].item() == 1.0
    assert stats["n_pairs"].item() == 1


def test_loss_gradient_pushes_winner_up():
    # d/dr_w of −log σ(r_w − r_l) = −σ(−(r_w − r_l)) = −σ(−1) = −0.268941421369995.
    scores = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss, _ = kwise_ranking_loss(scores, torch.tensor([0, 0]), torch.tensor([0, 1]))
    loss.backward()
    assert scores.grad.tolist() == pytest.approx([-0.268941421369995, 0.268941421369995], abs=1e-12)


def test_loss_k3_with_tie():
    # Answer 0 beats the tied answers 1 and 2: gaps 1.5 and 1.0, mean of sp(1.5) and sp(1).
    loss, stats = loss_of([2.0, 0.5, 1.0], [0, 0, 0], [0, 1, 1])
    assert loss.item() == pytest.approx((SP_1_5 + SP_1) / 2, abs=1e-12)  # 0.257337482750488
    assert stats["n_pairs"].item() == 2


def test_loss_k4_with_tie():
    # Answers 1 and 3 tie best (score 1), answer 0 next (0), answer 2 last (−1).
    # Pairs: (0,2) gap 1, (1,0) gap 1, (1,2) gap 2, (3,0) gap 1, (3,2) gap 2.
    # loss = (3·sp(1) + 2·sp(2)) / 5 = 0.238728216928123
    loss, stats = loss_of([0.0, 1.0, -1.0, 1.0], [0, 0, 0, 0], [1, 0, 2, 0])
    assert loss.item() == pytest.approx((3 * SP_1 + 2 * SP_2) / 5, abs=1e-12)
    assert stats["n_pairs"].item() == 5


def test_loss_variable_k_weighs_prompts_equally():
    # Prompt 7 (K=2) is ranked the wrong way round: sp(−1) = 1.313261687518223.
    # Prompt 5 (K=3) is all tied: no pair, contributes nothing.
    # Prompt 3 (K=4) is the k4 case above: 0.238728216928123.
    # Mean over the two prompts with pairs: (1.313261687518223 + 0.238728216928123) / 2
    # = 0.775994952223173.
    # (Weighting the 6 pairs equally would give 0.417817... instead.)
    loss, stats = loss_of(
        [0.0, 1.0, 5.0, -5.0, 0.0, 0.0, 1.0, -1.0, 1.0],
        [7, 7, 5, 5, 5, 3, 3, 3, 3],
        [0, 1, 0, 0, 0, 1, 0, 2, 0],
    )
    assert loss.item() == pytest.approx((SP_MINUS_1 + (3 * SP_1 + 2 * SP_2) / 5) / 2, abs=1e-12)
    assert stats["n_pairs"].item() == 6
    assert stats["pairwise_accuracy"].item() == pytest.approx(5 / 6)


def test_loss_margin():
    # −log σ(1 − 0.5) = sp(0.5); accuracy ignores the margin.
    loss, stats = loss_of([1.0, 0.0], [0, 0], [0, 1], margin=0.5)
    assert loss.item() == pytest.approx(SP_0_5, abs=1e-12)
    assert stats["pairwise_accuracy"].item() == 1.0


def test_loss_centring_penalty_covers_all_answers():
    # sp(1) + 0.1 · mean(1², 0², 3², 3²) = 0.313261687518223 + 0.1 · 19/4; the tied prompt's
    # scores (3, 3) count in the penalty although they form no pair.
    loss, _ = loss_of([1.0, 0.0, 3.0, 3.0], [0, 0, 1, 1], [0, 1, 0, 0], center_coef=0.1)
    assert loss.item() == pytest.approx(SP_1 + 0.475, abs=1e-12)


def test_loss_without_pairs_is_zero_and_differentiable():
    scores = torch.tensor([1.0, 2.0], requires_grad=True)
    loss, stats = kwise_ranking_loss(scores, torch.tensor([0, 0]), torch.tensor([0, 0]))
    loss.backward()
    assert loss.item() == 0.0
    assert scores.grad.tolist() == [0.0, 0.0]
    assert stats["n_pairs"].item() == 0
    assert math.isnan(stats["pairwise_accuracy"].item())


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one length"):
        loss_of([1.0, 0.0], [0, 0, 0], [0, 1, 2])


# --- ranking_metrics -----------------------------------------------------------------------


def test_metrics_single_prompt():
    # Ranks [0, 1, 2], scores [3, 1, 2]:
    #   (0,1) gap 1 right, (0,2) gap 2 right, (1,2) gap 1 wrong
    #   -> accuracy 2/3, gap 1: 0.5, gap 2: 1.
    #   tau-b: concordant (0,1), (0,2); discordant (1,2) -> (2 − 1) / 3.
    metrics = ranking_metrics([[3.0, 1.0, 2.0]], [[0, 1, 2]])
    assert metrics["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert metrics["accuracy_by_gap"] == pytest.approx({1: 0.5, 2: 1.0})
    assert metrics["mean_score_by_rank"] == pytest.approx({0: 3.0, 1: 1.0, 2: 2.0})
    assert metrics["kendall_tau"] == pytest.approx(1 / 3)
    assert (metrics["n_prompts"], metrics["n_pairs"]) == (1, 3)


@pytest.mark.parametrize(("scores", "tau"), [([3.0, 2.0, 1.0], 1.0), ([1.0, 2.0, 3.0], -1.0)])
def test_kendall_tau_perfect_orders(scores, tau):
    assert ranking_metrics([scores], [[0, 1, 2]])["kendall_tau"] == pytest.approx(tau)


def test_metrics_with_ties_over_prompts():
    # Prompt A: scores [0.9, 0.5, 0.5, 0.1], ranks [0, 1, 2, 2].
    #   Pairs: (0,1) g1 right, (0,2) g2 right, (0,3) g2 right, (1,2) g1 equal scores -> ½,
    #   (1,3) g1 right. tau-b: 4 concordant, 0 discordant, 6 pairs, 1 tie in scores (1,2),
    #   1 tie in labels (2,3) -> 4 / sqrt(5 · 5) = 0.8.
    # Prompt B: scores [1, 3, 2], ranks [0, 1, 2].
    #   Pairs: (0,1) g1 wrong, (0,2) g2 wrong, (1,2) g1 right. tau-b = (1 − 2) / 3 = −1/3.
    # Prompt C: labels all tied: no pair, tau undefined and left out of the mean.
    # accuracy = 5.5 / 8; gap 1: (1 + ½ + 1 + 0 + 1) / 5 = 0.7; gap 2: 2/3;
    # tau = (0.8 − 1/3) / 2 = 0.2333…; mean scores: rank 0 (0.9 + 1 + 1 + 2) / 4,
    # rank 1 (0.5 + 3) / 2, rank 2 (0.5 + 0.1 + 2) / 3.
    metrics = ranking_metrics(
        [[0.9, 0.5, 0.5, 0.1], [1.0, 3.0, 2.0], [1.0, 2.0]],
        [[0, 1, 2, 2], [0, 1, 2], [0, 0]],
    )
    assert metrics["pairwise_accuracy"] == pytest.approx(5.5 / 8)
    assert metrics["accuracy_by_gap"] == pytest.approx({1: 0.7, 2: 2 / 3})
    assert metrics["kendall_tau"] == pytest.approx((0.8 - 1 / 3) / 2)
    assert metrics["mean_score_by_rank"] == pytest.approx({0: 4.9 / 4, 1: 1.75, 2: 2.6 / 3})
    assert (metrics["n_prompts"], metrics["n_pairs"]) == (3, 8)


def test_metrics_constant_scores_sit_at_chance():
    metrics = ranking_metrics([[1.0, 1.0]], [[0, 1]])
    assert metrics["pairwise_accuracy"] == 0.5
    assert math.isnan(metrics["kendall_tau"])  # tau-b is undefined for constant scores


def test_metrics_reject_mismatched_lists():
    with pytest.raises(ValueError, match="prompt 0"):
        ranking_metrics([[1.0, 2.0]], [[0, 1, 2]])
