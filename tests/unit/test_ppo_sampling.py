"""Keyed sampling (`stages.ppo.sampling`): the hash matches splitmix64, the Gumbel-max draw follows
the softmax, and an episode's answer does not depend on the batch it is sampled in."""

from __future__ import annotations

import torch

from stages.ppo.experience import sample
from stages.ppo.sampling import GumbelNoise, episode_keys, splitmix64, uniform_noise
from tests.unit.test_ppo_rollout import EOS, PAD, PROMPTS, causal_lm, ppo_config


def test_splitmix64_matches_the_reference_sequence():
    # splitmix64 seeded with 0 yields 0xE220A8397B1DCDAF, then 0x6E789E6AA1B965F4.
    golden = 0x9E3779B97F4A7C15
    out = splitmix64(torch.tensor([0, golden - (1 << 64)], dtype=torch.int64))
    assert [value & ((1 << 64) - 1) for value in out.tolist()] == [0xE220A8397B1DCDAF,
                                                                   0x6E789E6AA1B965F4]


def test_noise_is_uniform_and_keyed():
    keys = episode_keys(0, 0, range(400))
    noise = uniform_noise(keys, 3, 100)
    assert 0 < noise.min() and noise.max() < 1
    assert abs(noise.mean().item() - 0.5) < 0.01
    assert torch.equal(noise, uniform_noise(keys, 3, 100))
    assert not torch.equal(noise, uniform_noise(keys, 4, 100))
    assert not torch.equal(keys, episode_keys(0, 1, range(400)))


def test_gumbel_argmax_draws_from_the_softmax():
    n = 20000
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).repeat(n, 1)
    noisy = GumbelNoise(episode_keys(7, 0, range(n)), prompt_width=0)(
        torch.zeros(n, 2, dtype=torch.long), logits.clone())
    frequencies = torch.bincount(noisy.argmax(1), minlength=4) / n
    # softmax([0, 1, 2, -1]) = [0.0871, 0.2369, 0.6439, 0.0321]
    expected = torch.tensor([0.0871, 0.2369, 0.6439, 0.0321])
    assert torch.allclose(frequencies, expected, atol=0.012), frequencies


def test_an_episode_draws_the_same_answer_in_any_batch():
    policy = causal_lm(0)
    config = ppo_config(generation={"max_new_tokens": 10})
    keys = episode_keys(5, 2, range(len(PROMPTS)))
    sequences, _, mask = sample(policy, PROMPTS, keys, config, EOS, PAD)
    width = mask.shape[1]
    for row, prompt in enumerate(PROMPTS):  # alone: no padding, no neighbours
        alone, _, alone_mask = sample(policy, [prompt], keys[row:row + 1], config, EOS, PAD)
        answer = alone[0, -alone_mask.shape[1]:][alone_mask[0].bool()]
        assert torch.equal(answer, sequences[row, -width:][mask[row].bool()]), row
    other_keys = episode_keys(6, 2, range(len(PROMPTS)))
    assert not torch.equal(sample(policy, PROMPTS, other_keys, config, EOS, PAD)[0], sequences)
