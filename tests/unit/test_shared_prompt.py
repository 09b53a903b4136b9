"""Shared-prompt scoring: a prompt and its K answers packed into one row give each answer exactly
the score, and the gradients, it gets as its own sequence.

The layout functions are checked against hand-built tensors; the exactness checks run on tiny
sequence classifiers of three families (the project's Llama, Qwen2, GPT-NeoX), each with sdpa and
eager attention, in fp32.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.data.packing import (block_attention_mask, fill_rows, pack_group,
                                   pack_shared_prompts, right_pad, shared_prefix_length)
from pipeline.ranking import encode_groups, kwise_ranking_loss
from pipeline.reward_model import (choose_shared_prompt, packed_scores, score_groups,
                                   score_sequences, sequence_scores)
from tests.unit.tiny_models import loss_and_grads, tiny_family_model

PAD = 1
# Three prompts' answers: K = 3 with a 4-token prompt, K = 2 with a 2-token prompt, and K = 1.
# Packed, their blocks of 10, 7 and 3 tokens fill two rows: [group 0], [group 1, group 2].
GROUPS = [[[5, 6, 7, 8, 9, 2], [5, 6, 7, 8, 10, 11, 2], [5, 6, 7, 8, 2]],
          [[3, 4, 12, 2], [3, 4, 13, 14, 2]],
          [[20, 21, 2]]]
RANKS = [[1, 0, 2], [0, 1], [0]]


# --- layout --------------------------------------------------------------------------------------


def test_shared_prefix_leaves_every_answer_its_last_token():
    assert shared_prefix_length([[5, 6, 7, 0], [5, 6, 9, 0]]) == 2
    assert shared_prefix_length([[5, 6], [5, 6, 7]]) == 1  # one sequence starts the other
    assert shared_prefix_length([[5, 6, 0]]) == 2  # alone: everything but its last token
    assert shared_prefix_length([[5, 0], [6, 0]]) == 0


def test_pack_group_exact_layout():
    ids, positions, segments, last = pack_group([[5, 6, 7, 0], [5, 6, 9, 9, 0]])
    assert ids == [5, 6, 7, 0, 9, 9, 0]
    assert positions == [0, 1, 2, 3, 2, 3, 4]
    assert segments == [-1, -1, 0, 0, 1, 1, 1]
    assert last == [3, 6]


def test_fill_rows_first_fit_by_decreasing_length():
    assert fill_rows([5, 2, 3, 4], width=5) == [[0], [3], [2, 1]]
    assert fill_rows([3, 3], width=3) == [[0], [1]]


def test_pack_shared_prompts_exact_tensors():
    # Blocks of 5, 2 and 3 tokens in rows of 5: [group 0], [group 2, group 1].
    batch = pack_shared_prompts([[[5, 6, 0], [5, 7, 0]], [[8, 0]], [[3, 4, 0]]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 0, 7, 0], [3, 4, 0, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 1, 2], [0, 1, 2, 0, 1]]
    assert batch["block_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["segment_ids"].tolist() == [[-1, 0, 0, 1, 1], [-1, -1, 0, -1, 0]]
    # Answers in group order: group 0's two, group 1's, group 2's.
    assert batch["score_rows"].tolist() == [0, 0, 1, 1]
    assert batch["score_columns"].tolist() == [2, 4, 4, 2]


def test_pack_shared_prompts_pads_short_rows():
    batch = pack_shared_prompts([[[5, 6, 0], [5, 7, 0]], [[8, 9, 0], [8, 0]]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 0, 7, 0], [8, 9, 0, 0, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["block_ids"][1].tolist() == [0, 0, 0, 0, -2]
    assert batch["segment_ids"][1].tolist() == [-1, 0, 0, 1, -2]


def test_block_mask_lets_an_answer_see_its_prompt_and_itself_only():
    # Row [prompt p, answer 0: a a, answer 1: b | next block: prompt q, answer c | pad].
    blocks = torch.tensor([[0, 0, 0, 0, 1, 1, -2]])
    segments = torch.tensor([[-1, 0, 0, 1, -1, 0, -2]])
    allowed = block_attention_mask(blocks, segments)
    assert allowed.shape == (1, 1, 7, 7)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0, 0],   # p sees itself
                                            [1, 1, 0, 0, 0, 0, 0],   # a sees p, itself
                                            [1, 1, 1, 0, 0, 0, 0],   # a sees p, a, itself
                                            [1, 0, 0, 1, 0, 0, 0],   # b sees p and itself
                                            [0, 0, 0, 0, 1, 0, 0],   # q: its block only
                                            [0, 0, 0, 0, 1, 1, 0],   # c sees q and itself
                                            [0, 0, 0, 0, 0, 0, 1]]   # padding: itself


# --- exactness -----------------------------------------------------------------------------------


def tiny_classifier(family: str, attention: str):
    """A randomly initialized one-label classifier of `family` with a 32-wide, 2-layer body."""
    return tiny_family_model(family, attention, "AutoModelForSequenceClassification",
                             pad_token_id=PAD, num_labels=1)


def separate_scores(model) -> torch.Tensor:
    input_ids, attention_mask = right_pad([seq for seqs in GROUPS for seq in seqs], PAD)
    return sequence_scores(model, input_ids, attention_mask)


def ranking_loss(scores_of):
    """The K-wise ranking loss of the scores `scores_of(model)` gives, as `loss_and_grads` takes it."""
    return lambda model: kwise_ranking_loss(scores_of(model), *encode_groups(RANKS),
                                            center_coef=0.1)[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_packed_scores_and_gradients_equal_separate_sequences(family, attention):
    model = tiny_classifier(family, attention)
    separate = separate_scores(model)
    batch = pack_shared_prompts(GROUPS, PAD)
    assert batch["input_ids"].shape == (2, 10)  # two blocks share the second row
    packed = packed_scores(model, batch)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)
    assert separate.std() > 1e-3  # the answers' scores really differ

    loss_separate, grads_separate = loss_and_grads(model, ranking_loss(separate_scores))
    loss_packed, grads_packed = loss_and_grads(model, ranking_loss(
        lambda model: packed_scores(model, pack_shared_prompts(GROUPS, PAD))))
    assert loss_packed == pytest.approx(loss_separate, abs=1e-6)
    for name, grad in grads_separate.items():
        assert grad.abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=0, msg=name)


def test_packed_scores_through_a_lora_adapter_equal_separate_sequences():
    from pipeline.config import LoraConfig
    from pipeline.models import apply_lora

    model = apply_lora(tiny_classifier("llama", "sdpa"), LoraConfig(enabled=True),
                       task_type="SEQ_CLS")
    torch.testing.assert_close(packed_scores(model, pack_shared_prompts(GROUPS, PAD)),
                               separate_scores(model), atol=1e-5, rtol=0)


def test_score_groups_keeps_group_order_across_batches():
    model = tiny_classifier("llama", "sdpa").eval()
    flat = score_sequences(model, [seq for seqs in GROUPS for seq in seqs])
    # At most 3 answers a batch: the K = 3 group alone, the others together.
    grouped = score_groups(model, GROUPS, batch_size=3)
    assert [len(scores) for scores in grouped] == [3, 2, 1]
    assert [s for scores in grouped for s in scores] == pytest.approx(flat, abs=1e-5)


# --- fallback ------------------------------------------------------------------------------------


def test_attention_without_block_masks_falls_back_to_separate_sequences():
    model = tiny_classifier("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # takes padding masks only
    shared, how = choose_shared_prompt(model, GROUPS)
    assert not shared
    assert how.startswith("the model's flash_attention_2 attention takes no block attention mask")
    assert "scoring each answer as its own sequence" in how


def test_a_model_that_ignores_position_ids_is_caught_by_the_check():
    import transformers

    class PositionBlind(transformers.LlamaForSequenceClassification):
        """Numbers every row's tokens 0, 1, 2, ... whatever position ids it is given."""

        def forward(self, position_ids=None, **inputs):
            return super().forward(**inputs)

    config = tiny_classifier("llama", "sdpa").config
    config.initializer_range = 0.3  # attention sharp enough that positions change the scores
    torch.manual_seed(0)
    model = PositionBlind(config)
    shared, how = choose_shared_prompt(model, GROUPS)
    assert not shared
    assert how.startswith("the model's scores change under a block attention mask")


def test_a_supported_model_is_packed():
    shared, how = choose_shared_prompt(tiny_classifier("qwen2", "eager"), GROUPS)
    assert shared
    assert how == "each prompt is computed once for its answers (packed, block attention mask)"
