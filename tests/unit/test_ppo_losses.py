"""Unit tests of the PPO math in stages.ppo.losses, against values worked out by hand."""

import math

import pytest
import torch

from stages.ppo.losses import (
    AdaptiveKLController,
    FixedKLController,
    ended_with_eos,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k3,
    last_valid_index,
    logprobs_from_logits,
    masked_log_ratio,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    response_mask_after_eos,
    value_loss,
)

LN2 = math.log(2.0)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# --- masks ---------------------------------------------------------------------------------


def test_response_mask_after_eos():
    eos = 2
    ids = torch.tensor(
        [
            [2, 5, 5, 5],  # EOS first: only the EOS itself is the response
            [5, 2, 2, 2],  # EOS in the middle, then padding that equals EOS
            [5, 5, 5, 5],  # no EOS: the whole sampled length
            [5, 5, 5, 2],  # EOS last
        ]
    )
    assert response_mask_after_eos(ids, eos).tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 1, 1, 1],
    ]
    assert ended_with_eos(ids, eos).tolist() == [True, True, False, True]
    assert last_valid_index(response_mask_after_eos(ids, eos)).tolist() == [0, 1, 3, 3]


def test_last_valid_index_rejects_empty_rows():
    with pytest.raises(ValueError, match="at least one valid token"):
        last_valid_index(torch.tensor([[1, 0], [0, 0]]))


# --- masked statistics ---------------------------------------------------------------------


def test_masked_mean():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(8 / 3)  # (1 + 3 + 4) / 3
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.0, 3.5])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_unbiased_and_biased():
    # Valid values 1, 3, 5: mean 3, squared deviations 4 + 0 + 4 = 8 -> unbiased 8/2, biased 8/3.
    x = t([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert masked_var(x, mask).item() == pytest.approx(4.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(8 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0], [0, 0]]))


def test_masked_whiten():
    # Valid values 1, 3, 5: mean 3, unbiased std 2 -> −1, 0, 1; the masked 100 becomes 0.
    x = t([[1.0, 3.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_whiten(x, mask).tolist() == [pytest.approx([-1.0, 0.0, 1.0, 0.0])]
    # Keeping the mean: −1 + 3, 0 + 3, 1 + 3.
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    assert kept_mean.tolist() == [pytest.approx([2.0, 3.0, 4.0, 0.0])]


# --- KL and rewards ------------------------------------------------------------------------


def test_kl_estimators():
    # Token 0: π = ½, π_ref = ¼ -> k1 = ln 2; r = π_ref/π = ½ -> k3 = (½ − 1) − ln ½ = ln 2 − ½.
    # Token 1: π = ¼, π_ref = ½ -> k1 = −ln 2; r = 2 -> k3 = 1 − ln 2.
    # Token 2: equal -> both 0. Token 3 is masked: 0, however far apart the two log-probs are.
    logp = t([[math.log(0.5), math.log(0.25), math.log(0.3), 0.0]])
    ref_logp = t([[math.log(0.25), math.log(0.5), math.log(0.3), -1e4]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert kl_k1(logp, ref_logp, mask).tolist() == [pytest.approx([LN2, -LN2, 0.0, 0.0])]
    assert kl_k3(logp, ref_logp, mask).tolist() == [pytest.approx([LN2 - 0.5, 1 - LN2, 0.0, 0.0])]


def test_masked_log_ratio_is_zero_where_masked_even_for_infinite_log_probs():
    # Valid: 0.5 − 0.25 = 0.25 and −1 − (−3) = 2; masked: an inf and a NaN become exactly 0.
    logp = t([[0.5, -1.0, math.inf, math.nan]])
    old_logp = t([[0.25, -3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 0]])
    assert masked_log_ratio(logp, old_logp, mask).tolist() == [[0.25, 2.0, 0.0, 0.0]]


def test_per_token_rewards():
    # Row 0 (2 valid tokens): −0.1·[0.1, 0.2] and score 2 on token 1 -> [−0.01, 1.98, 0].
    # Row 1 (3 valid tokens): −0.1·[0.5, −0.5, 1.0] and score −1 on token 2 -> [−0.05, 0.05, −1.1].
    scores = t([2.0, -1.0])
    kl = t([[0.1, 0.2, 0.3], [0.5, -0.5, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.1)
    assert rewards.tolist() == [
        pytest.approx([-0.01, 1.98, 0.0]),
        pytest.approx([-0.05, 0.05, -1.1]),
    ]


# --- GAE -----------------------------------------------------------------------------------


def test_gae_1x3():
    # γ = 1, λ = 0.5; rewards [1, 0, 2], values [0.5, 1, 1.5].
    # t=2: δ = 2 + 0 − 1.5 = 0.5                    A = 0.5
    # t=1: δ = 0 + 1.5 − 1 = 0.5                    A = 0.5 + 0.5·0.5 = 0.75
    # t=0: δ = 1 + 1 − 0.5 = 1.5                    A = 1.5 + 0.5·0.75 = 1.875
    # returns = A + V = [2.375, 1.75, 2.0]
    rewards, values = t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert advantages.tolist() == [pytest.approx([1.875, 0.75, 0.5])]
    assert returns.tolist() == [pytest.approx([2.375, 1.75, 2.0])]


def test_gae_2x4_with_mask():
    # γ = 0.9, λ = 0.8 (γλ = 0.72).
    # Row 0, two valid tokens; the masked rewards/values (5, 7, 9, 9) must be ignored.
    #   t=1: δ = 1 + 0.9·0 − 2 = −1 (no bootstrap after the last token)   A = −1
    #   t=0: δ = 0 + 0.9·2 − 1 = 0.8                                      A = 0.8 − 0.72 = 0.08
    #   returns [1.08, 1.0, 0, 0]
    # Row 1, all valid: rewards [1, 0, 0, 1], values [0, 0.5, 0.5, 1].
    #   t=3: δ = 1 − 1 = 0                           A = 0
    #   t=2: δ = 0.9·1 − 0.5 = 0.4                   A = 0.4
    #   t=1: δ = 0.9·0.5 − 0.5 = −0.05               A = −0.05 + 0.72·0.4 = 0.238
    #   t=0: δ = 1 + 0.9·0.5 − 0 = 1.45              A = 1.45 + 0.72·0.238 = 1.62136
    #   returns [1.62136, 0.738, 0.9, 1.0]
    rewards = t([[0.0, 1.0, 5.0, 7.0], [1.0, 0.0, 0.0, 1.0]])
    values = t([[1.0, 2.0, 9.0, 9.0], [0.0, 0.5, 0.5, 1.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages.tolist() == [
        pytest.approx([0.08, -1.0, 0.0, 0.0]),
        pytest.approx([1.62136, 0.238, 0.4, 0.0]),
    ]
    assert returns.tolist() == [
        pytest.approx([1.08, 1.0, 0.0, 0.0]),
        pytest.approx([1.62136, 0.738, 0.9, 1.0]),
    ]


# --- clipped losses ------------------------------------------------------------------------


def test_policy_loss_clipping():
    # ε = 0.2, old log-probs 0 so ratio = exp(logp). Per token −A·ratio vs −A·clip(ratio):
    #   A=+1, ratio 1.5 (above range): −1.5 vs −1.2 -> −1.2, clipped (no gradient)
    #   A=+1, ratio 0.5 (below range): −0.5 vs −0.8 -> −0.5, unclipped
    #   A=−1, ratio 0.5 (below range):  0.5 vs  0.8 ->  0.8, clipped
    #   A=−2, ratio 1.1 (inside):       2.2 vs  2.2 ->  2.2, unclipped
    #   fifth token masked out
    # loss = (−1.2 − 0.5 + 0.8 + 2.2) / 4 = 0.325; clip fraction 2/4.
    # approx_kl = mean of k3 = (ratio − 1) − ln ratio:
    #   (0.5 − ln 1.5) + 2·(−0.5 + ln 2) + (0.1 − ln 1.1), divided by 4.
    ratios = [1.5, 0.5, 0.5, 1.1, 3.0]
    logp = torch.log(t([ratios])).requires_grad_()
    advantages = t([[1.0, 1.0, -1.0, -2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logp, torch.zeros(1, 5, dtype=torch.float64), advantages, mask, 0.2)
    assert loss.item() == pytest.approx(0.325)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    expected_kl = ((0.5 - math.log(1.5)) + 2 * (LN2 - 0.5) + (0.1 - math.log(1.1))) / 4
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)  # 0.1213797
    # d loss / d logp = −A·ratio / 4 where unclipped: token 1 −0.125, token 3 2·1.1/4 = 0.55.
    loss.backward()
    assert logp.grad.tolist() == [pytest.approx([0.0, -0.125, 0.0, 0.55, 0.0])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_policy_loss_ignores_padding_log_probs_in_half_precision(dtype):
    # Token 0: ratio e^0 = 1, A = 2 -> −2 (inside the clip range). Token 1: ln 1.5, A = 1 -> −1.2
    # (clipped). Tokens 2-3 are padding whose log-ratio is 100 (e^100 is inf in these dtypes) and
    # −inf: masked before exp, they add nothing. loss = (−2 − 1.2) / 2 = −1.6, clip fraction ½,
    # approx_kl = (0 + (0.5 − ln 1.5)) / 2. Gradient d loss / d logp = −A·ratio / 2 on token 0 only.
    logp = torch.tensor([[0.0, math.log(1.5), 100.0, -math.inf]], dtype=dtype, requires_grad=True)
    old_logp = torch.zeros(1, 4, dtype=dtype)
    advantages = torch.tensor([[2.0, 1.0, 0.0, 0.0]], dtype=dtype)
    mask = torch.tensor([[1, 1, 0, 0]])
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    tolerance = 1e-2 if dtype != torch.float32 else 1e-6
    assert loss.item() == pytest.approx(-1.6, rel=tolerance)
    assert stats["clip_fraction"].item() == 0.5
    assert stats["approx_kl"].item() == pytest.approx((0.5 - math.log(1.5)) / 2, rel=5e-2)
    loss.backward()
    assert logp.grad.float().tolist() == [[-1.0, 0.0, 0.0, 0.0]]


def test_value_loss_clipping():
    # ε = 0.2, old values 0. Per token (V − R)² vs (V_clipped − R)²:
    #   V 0.5,  R 1:  0.25 vs (0.2 − 1)²  = 0.64 -> 0.64, clipped
    #   V 0.1,  R 1:  0.81 vs 0.81             -> 0.81, inside the range
    #   V 0.5,  R 0:  0.25 vs 0.04             -> 0.25, unclipped
    #   V −1,   R −2: 1.0  vs (−0.2 + 2)² = 3.24 -> 3.24, clipped
    #   fifth token masked out
    # loss = ½ · (0.64 + 0.81 + 0.25 + 3.24) / 4 = 0.6175; clip fraction 2/4.
    values = t([[0.5, 0.1, 0.5, -1.0, 50.0]])
    returns = t([[1.0, 1.0, 0.0, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, torch.zeros(1, 5, dtype=torch.float64), returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.6175)
    assert stats["value_clip_fraction"].item() == pytest.approx(0.5)


# --- logits --------------------------------------------------------------------------------


def test_logprobs_with_temperature():
    # Logits [0, ln 9]: at T=1 probabilities [0.1, 0.9]; at T=2 the logits become [0, ln 3],
    # probabilities [0.25, 0.75].
    logits = t([[[0.0, math.log(9.0)], [0.0, math.log(9.0)]]])  # (1, 2, 2)
    tokens = torch.tensor([[0, 1]])
    assert logprobs_from_logits(logits, tokens).tolist() == [
        pytest.approx([math.log(0.1), math.log(0.9)])
    ]
    assert logprobs_from_logits(logits, tokens, temperature=2.0).tolist() == [
        pytest.approx([math.log(0.25), math.log(0.75)])
    ]


def test_entropy_from_logits():
    # Token 0 uniform over 2: ln 2. Token 1 [0.1, 0.9]: −(0.1 ln 0.1 + 0.9 ln 0.9) = 0.325083;
    # at T=2 [0.25, 0.75]: 0.562335. Token 2 is masked out.
    logits = t([[[0.0, 0.0], [0.0, math.log(9.0)], [0.0, 50.0]]])
    mask = torch.tensor([[1, 1, 0]])
    h_09 = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    h_075 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits, mask).item() == pytest.approx((LN2 + h_09) / 2)
    entropy_at_2 = entropy_from_logits(logits, mask, temperature=2.0)
    assert entropy_at_2.item() == pytest.approx((LN2 + h_075) / 2)


# --- diagnostics ---------------------------------------------------------------------------


def test_explained_variance():
    # Valid returns [1, 2, 3] (unbiased var 1); the masked fourth token holds garbage.
    returns = t([[1.0, 2.0, 3.0, 40.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(t([[1.0, 2.0, 3.0, 0.0]]), returns, mask).item() == pytest.approx(1.0)
    # Constant prediction: residuals [−1, 0, 1] have the variance of the returns -> 0.
    assert explained_variance(t([[2.0, 2.0, 2.0, 0.0]]), returns, mask).item() == pytest.approx(0.0)
    # Values [1, 2, 2]: residuals [0, 0, 1], mean ⅓, unbiased var (1/9 + 1/9 + 4/9) / 2 = ⅓,
    # so 1 − ⅓.
    partly_right = explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), returns, mask)
    assert partly_right.item() == pytest.approx(2 / 3)


# --- KL controllers ------------------------------------------------------------------------


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 vs target 6: error 0.5 clipped to 0.2 -> β · (1 + 0.2 · 512 / 10000) = 0.1 · 1.01024.
    controller.update(current_kl=9.0, n_steps=512)
    assert controller.value == pytest.approx(0.101024)
    # KL 5.4: error 0.9 − 1 = −0.1 -> β · (1 − 0.1 · 1000 / 10000) = 0.101024 · 0.99.
    controller.update(current_kl=5.4, n_steps=1000)
    assert controller.value == pytest.approx(0.10001376)
    # KL 0: error −1 clipped to −0.2 -> β · (1 − 0.2 · 1).
    controller.update(current_kl=0.0, n_steps=10000)
    assert controller.value == pytest.approx(0.10001376 * 0.8)


def test_kl_controllers_round_trip_state():
    adaptive = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    adaptive.update(current_kl=9.0, n_steps=512)
    resumed = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(adaptive.state_dict())
    assert resumed.value == adaptive.value == pytest.approx(0.101024)

    fixed = FixedKLController(0.02)
    fixed.update(current_kl=100.0, n_steps=512)
    assert fixed.value == 0.02
    fixed.load_state_dict({"kl_coef": 0.05})
    assert fixed.state_dict() == {"kl_coef": 0.05}


# --- whitening across processes ------------------------------------------------------------


def test_masked_whiten_across_processes_matches_one_batch():
    # Two processes hold [1, 3 | pad] and [5, 7 | 9]: together the valid values 1, 3, 5, 7, 9 have
    # mean 5 and unbiased variance (16 + 4 + 0 + 4 + 16) / 4 = 10, so each whitens to (v − 5) / √10.
    import threading

    shards = [(t([[1.0, 3.0, 0.0]]), torch.tensor([[1, 1, 0]])),
              (t([[5.0, 7.0, 9.0]]), torch.tensor([[1, 1, 1]]))]
    barrier = threading.Barrier(len(shards))
    posted: list = [None] * len(shards)

    def sum_over_processes(rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            posted[rank] = tensor
            barrier.wait()  # every process has posted its part
            total = sum(posted)
            barrier.wait()  # every process has read the total before the next call overwrites it
            return total
        return reduce

    results: list = [None] * len(shards)

    def whiten(rank: int) -> None:
        x, mask = shards[rank]
        results[rank] = masked_whiten(x, mask, sum_over_processes=sum_over_processes(rank))

    threads = [threading.Thread(target=whiten, args=(rank,)) for rank in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    root10 = math.sqrt(10.0)
    assert results[0].tolist() == [pytest.approx([-4 / root10, -2 / root10, 0.0])]
    assert results[1].tolist() == [pytest.approx([0.0, 2 / root10, 4 / root10])]
    # A single process passing the identity is the plain whitening of its batch.
    x, mask = t([[1.0, 3.0, 5.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    single = masked_whiten(x, mask, sum_over_processes=lambda tensor: tensor)
    assert single.tolist() == [pytest.approx([-1.0, 0.0, 1.0, 0.0])]
