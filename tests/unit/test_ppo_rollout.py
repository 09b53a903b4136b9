"""Unit tests of the PPO rollout and one trainer step, on tiny random Llama models (CPU, seconds).

The central check: log-probs recomputed by a full forward pass with position ids from the attention
mask agree with what `generate` sampled from, for left-padded prompts; numbering positions naively
breaks it, which is where negative KL comes from.
"""

import math

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.data.packing import left_pad
from stages.ppo.losses import logprobs_from_logits, masked_mean, response_mask_after_eos
from stages.ppo.config import Config
from stages.ppo.experience import make_experience
from stages.ppo.models import (Models, PolicyEMA, TokenScorer, ValueHead, positions,
                               response_logits, use_packing)
from stages.ppo.sampling import episode_keys
from stages.ppo.threads import side_by_side
from stages.ppo.update import PPOTrainer, step_seed

EOS, PAD, VOCAB = 0, 1, 24
# Wide initial weights give peaked next-token distributions, which position mistakes visibly change.
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # different lengths: left padding matters


def llama_config(**extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                       eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None,
                       tie_word_embeddings=False, initializer_range=0.3, **extra)


def causal_lm(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).eval()


def classifier(seed: int) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config(num_labels=1)).eval()


def ppo_config(**sections) -> Config:
    raw = {"seed": 3, "generation": {"max_new_tokens": 8, "temperature": 0.7},
           "train": {"batch_size": 3, "max_steps": 4, "lr": 1e-2, "warmup_steps": 0},
           "ppo": {"epochs": 2, "minibatches": 1}, "kl": {"coef": 0.1}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return Config.model_validate(raw)


def tiny_models(shared_backbone: bool = False) -> Models:
    policy = causal_lm(0)
    reference = causal_lm(0).requires_grad_(False)
    reward = TokenScorer(classifier(1)).requires_grad_(False)
    if shared_backbone:
        return Models(policy, reference, reward, None, ValueHead(32))
    return Models(policy, reference, reward, TokenScorer(classifier(1)), None)


def rollout(models: Models, config: Config, seed: int = 0):
    return make_experience(models, PROMPTS, episode_keys(seed, 0, range(len(PROMPTS))), config, config.kl.coef, eos_token_id=EOS,
                           pad_token_id=PAD, sum_over_processes=lambda tensor: tensor, timings={})


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def gpt2_lm(seed: int):
    """A model with absolute position embeddings, where left padding shifts every position."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                                      n_positions=64, eos_token_id=EOS, pad_token_id=PAD,
                                      bos_token_id=None, initializer_range=0.3)).eval()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("make_policy", [causal_lm, gpt2_lm], ids=["llama", "gpt2"])
def test_recomputed_logprobs_match_sampling_with_left_padding(make_policy, packed):
    policy = make_policy(0)
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                              max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD,
                              output_logits=True, return_dict_in_generate=True)
    width = len(out.logits)
    responses = out.sequences[:, -width:]
    mask = response_mask_after_eos(responses, EOS)
    sequences = out.sequences
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    valid = mask.bool()
    sampled = logprobs_from_logits(torch.stack(out.logits, dim=1), responses, 0.7)[valid]
    with torch.no_grad():
        recomputed = response_logits(policy, sequences, attention_mask, width, packed=packed)[0]
    assert torch.allclose(logprobs_from_logits(recomputed, responses, 0.7)[valid], sampled,
                          atol=1e-4)
    # Without the temperature the log-probs disagree: the classic source of negative KL.
    assert not torch.allclose(logprobs_from_logits(recomputed, responses, 1.0)[valid], sampled,
                              atol=1e-2)
    if make_policy is gpt2_lm:
        # Absolute positions numbered 0..L-1 through the padding disagree too (RoPE is relative,
        # so Llama does not care about a constant offset).
        numbered = torch.arange(sequences.shape[1]).expand_as(sequences)
        with torch.no_grad():
            naive = policy(input_ids=sequences, attention_mask=attention_mask,
                           position_ids=numbered).logits[:, -width - 1:-1]
        assert not torch.allclose(logprobs_from_logits(naive, responses, 0.7)[valid], sampled,
                                  atol=1e-2)


def test_experience_masks_scores_and_zero_kl_against_an_identical_reference():
    models = tiny_models()
    config = ppo_config(generation={"max_new_tokens": 12})
    experience = rollout(models, config, seed=1)
    responses, mask = experience.responses, experience.response_mask
    for row in range(len(experience)):
        tokens = responses[row].tolist()
        first_eos = tokens.index(EOS) if EOS in tokens else None
        length = len(tokens) if first_eos is None else first_eos + 1
        assert mask[row].tolist() == [1] * length + [0] * (len(tokens) - length)
        assert all(t == PAD for t in tokens[length:])  # padding after the EOS
        assert bool(experience.ended[row]) == (first_eos is not None)
    assert experience.ended.any() and not experience.ended.all(), "seed should give both kinds"
    # Policy == reference: the per-token KL is (numerically) zero, never clearly negative.
    assert experience.kl.abs().max() < 1e-4
    # The reward model is read at the EOS: the same as its own pooled score of the answer alone
    # (transformers pools at the last non-pad token of a right-padded sequence).
    prompt_width = experience.sequences.shape[1] - experience.response_width
    for row in range(len(experience)):
        valid = experience.attention_mask[row].bool()
        ids = experience.sequences[row][valid].unsqueeze(0)
        with torch.no_grad():
            pooled = models.reward_model.classifier(input_ids=ids).logits[0, 0]
        assert experience.rm_scores[row].item() == pytest.approx(pooled.item(), abs=1e-5)
    # Answers that never ended get the fixed penalty instead of their score.
    assert experience.scores[~experience.ended].tolist() == [-1.0] * int((~experience.ended).sum())
    assert torch.equal(experience.scores[experience.ended], experience.rm_scores[experience.ended])
    # Whitened advantages: mean 0 over valid tokens, 0 where masked.
    assert masked_mean(experience.advantages, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert (experience.advantages[mask == 0] == 0).all()
    assert experience.returns.shape == experience.values.shape == mask.shape
    assert prompt_width == max(len(p) for p in PROMPTS)


def test_min_new_tokens_forces_full_answers_and_the_penalty():
    config = ppo_config(generation={"max_new_tokens": 6, "min_new_tokens": 6},
                        reward={"missing_eos_penalty": -3.0})
    models = tiny_models()
    # Make EOS the likeliest token: only min_new_tokens keeps it out.
    with torch.no_grad():
        models.policy.lm_head.weight[EOS] = 10 * models.policy.lm_head.weight.abs().max()
    experience = rollout(models, config)
    assert experience.response_mask.tolist() == [[1] * 6] * 3
    assert experience.scores.tolist() == [-3.0] * 3
    assert not experience.ended.any()


def test_rows_select_episodes():
    experience = rollout(tiny_models(), ppo_config())
    part = experience.rows(torch.tensor([2, 0]))
    assert len(part) == 2
    assert torch.equal(part.sequences, experience.sequences[[2, 0]])
    assert torch.equal(part.rm_scores, experience.rm_scores[[2, 0]])
    assert part.entropy is experience.entropy


def trained_weights(shared_backbone: bool, **sections) -> tuple[dict, dict]:
    config = ppo_config(value={"shared_backbone": shared_backbone}, **sections)
    models = tiny_models(shared_backbone)
    initial = {name: p.detach().clone() for name, p in models.policy.named_parameters()}
    trainer = PPOTrainer(config, Accelerator(cpu=True), models, eos_token_id=EOS, pad_token_id=PAD)
    for step in range(2):
        metrics, _ = trainer.step(step, PROMPTS, range(len(PROMPTS)))
    expected = {"rm_score_mean", "rm_score_std", "kl", "entropy", "clip_fraction", "approx_kl",
                "value_loss", "policy_loss", "value_clip_fraction", "explained_variance",
                "response_length", "eos_rate", "lr", "kl_coef", "episodes_per_s",
                "time_generate", "time_score", "time_update"}
    assert expected <= metrics.keys()
    assert all(math.isfinite(value) for name, value in metrics.items()
               if name != "explained_variance")
    weights = {name: p.detach().clone() for name, p in models.policy.named_parameters()}
    return initial, weights


@pytest.mark.parametrize("shared_backbone", [False, True])
def test_trainer_steps_are_deterministic_and_move_every_policy_weight(shared_backbone):
    initial, first = trained_weights(shared_backbone)
    _, second = trained_weights(shared_backbone)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between equal runs"
        assert not torch.equal(first[name], initial[name]), f"{name} never updated"


def test_side_by_side_keeps_order_grad_mode_and_autocast():
    def mode():
        return torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        results = side_by_side(mode, mode, lambda: "third", workers=3)
    assert results == [(False, True), (False, True), "third"]
    assert side_by_side(mode, lambda: 2, workers=2) == [(True, False), 2]


def test_passes_side_by_side_train_like_passes_in_turn():
    _, in_turn = trained_weights(False, ppo={"side_by_side": False})
    _, beside = trained_weights(False, ppo={"side_by_side": True})
    for name in in_turn:
        torch.testing.assert_close(beside[name], in_turn[name], rtol=1e-4, atol=1e-5)


def test_step_seed_depends_on_seed_step_and_process():
    seeds = {step_seed(0, 0, 0), step_seed(0, 1, 0), step_seed(0, 0, 1), step_seed(1, 0, 0)}
    assert len(seeds) == 4
    assert step_seed(5, 7, 0) == step_seed(5, 7, 0)


def test_policy_ema_update_and_copy():
    policy = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = PolicyEMA(policy, decay=0.75)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[5.0, 6.0]]))
    ema.update(policy)  # 0.75 · [1, 2] + 0.25 · [5, 6] = [2, 3]
    ema.copy_to(policy)
    assert policy.weight.tolist() == [[2.0, 3.0]]


@pytest.mark.parametrize("shared_backbone", [False, True])
def test_first_ratio_is_exactly_one_in_bf16(shared_backbone):
    # bf16 weights on a CPU: the old log-probs come from the same full forward pass the update
    # runs, so before the first optimizer step every ratio is exactly 1 (approx KL 0, nothing
    # clipped). Log-probs from generate's KV-cache logits differ from it in the last bits.
    config = ppo_config(value={"shared_backbone": shared_backbone},
                        ppo={"epochs": 1, "minibatches": 1}, generation={"max_new_tokens": 12})
    models = tiny_models(shared_backbone)
    for model in (models.policy, models.reference, models.reward_model, models.critic):
        model.to(torch.bfloat16)
    trainer = PPOTrainer(config, Accelerator(cpu=True), models, eos_token_id=EOS, pad_token_id=PAD)
    metrics, experience = trainer.step(0, PROMPTS, range(len(PROMPTS)))
    assert experience.response_mask.sum() > len(PROMPTS), "answers should be longer than EOS"
    assert metrics["approx_kl"] == 0.0
    assert metrics["clip_fraction"] == 0.0
    assert all(math.isfinite(value) for name, value in metrics.items()
               if name != "explained_variance")


PACKED = "each episode's real tokens only through the models (no padding computed)"


@pytest.mark.parametrize("shared_backbone", [False, True], ids=["value-model", "value-head"])
def test_packed_passes_give_the_padded_experience(shared_backbone):
    config = ppo_config(generation={"max_new_tokens": 12})
    padded = rollout(tiny_models(shared_backbone), config, seed=1)
    models = tiny_models(shared_backbone)
    assert use_packing(models, PROMPTS[0], PAD) == PACKED
    assert models.packed and models.reward_model.packed
    packed = rollout(models, config, seed=1)
    assert torch.equal(packed.sequences, padded.sequences)
    mask = padded.response_mask.bool()
    for name in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(packed, name)[mask], getattr(padded, name)[mask],
                                   atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(packed.rm_scores, padded.rm_scores, atol=1e-5, rtol=0)


def test_a_policy_that_drops_the_row_layout_keeps_padded_passes():
    class LayoutBlind(LlamaForCausalLM):
        """Attends causally along the whole sequence of packed tokens: it drops the mask, the
        positions and the row layout it is given."""

        def forward(self, attention_mask=None, position_ids=None, row_layout=None, **inputs):
            return super().forward(**inputs)

    models = tiny_models()
    torch.manual_seed(0)
    models.policy = LayoutBlind(llama_config()).eval()
    how = use_packing(models, PROMPTS[0], PAD)
    assert how.startswith("padded passes (the models' outputs change when packed: policy logits")
    assert not models.packed and not models.reward_model.packed
    assert models.policy.config._attn_implementation == "sdpa"  # its own attention again
