"""Padding-free SFT batches: a step's conversations placed whole into rows, each attending only to
itself, give the loss and the gradients of the padded batch of the same conversations.

The layout is checked against hand-built tensors; the exactness checks run on tiny causal LMs of
three families (the project's Llama, Qwen2, GPT-NeoX), each with sdpa and eager attention, in fp32.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.data.packing import pack_padding_free, pad_labeled
from pipeline.tokenizer import IGNORE_INDEX as X
from stages.sft import DataSection, choose_padding_free, sft_loss
from tests.unit.tiny_models import loss_and_grads, tiny_family_model

PAD = 1
# Three conversations of 6, 3 and 4 tokens, the answers' tokens labeled. In rows of 8: the first
# alone, the other two together.
EXAMPLES = [{"input_ids": [5, 6, 7, 8, 9, 2], "labels": [X, X, X, 8, 9, 2]},
            {"input_ids": [3, 4, 2], "labels": [X, 4, 2]},
            {"input_ids": [10, 11, 12, 2], "labels": [X, X, 12, 2]}]


# --- layout --------------------------------------------------------------------------------------


def test_pack_padding_free_exact_tensors():
    batch = pack_padding_free(EXAMPLES, width=8, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, PAD],
                                           [10, 11, 12, 2, 3, 4, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[X, X, X, 8, 9, 2, X], [X, X, 12, 2, X, 4, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 0, 1, 2]]
    assert batch["block_ids"].tolist() == [[0, 0, 0, 0, 0, 0, -2], [0, 0, 0, 0, 1, 1, 1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 0, -2], [0, 0, 0, 0, 0, 0, 0]]


def test_an_example_first_token_is_never_a_target():
    # Labeled from its first token, the second example's first token would be the target of the
    # first example's last token, one row position earlier.
    examples = [{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8], "labels": [7, 8]}]
    batch = pack_padding_free(examples, width=4, pad_id=PAD)
    assert batch["labels"].tolist() == [[X, 6, X, 8]]


def test_rows_widen_to_a_conversation_longer_than_the_width():
    batch = pack_padding_free(EXAMPLES, width=4, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [10, 11, 12, 2, PAD, PAD],
                                           [3, 4, 2, PAD, PAD, PAD]]


# --- exactness -----------------------------------------------------------------------------------


def tiny_lm(family: str, attention: str):
    return tiny_family_model(family, attention, "AutoModelForCausalLM", pad_token_id=PAD)


def sft_loss_of(batch: dict):
    return lambda model: sft_loss(model, batch)[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_loss_and_gradients_equal_the_padded_batch(family, attention):
    model = tiny_lm(family, attention)
    loss_padded, grads_padded = loss_and_grads(model, sft_loss_of(pad_labeled(EXAMPLES, PAD)))
    loss_rows, grads_rows = loss_and_grads(model, sft_loss_of(pack_padding_free(EXAMPLES, 8, PAD)))
    assert loss_rows == pytest.approx(loss_padded, abs=1e-6)
    for name, grad in grads_padded.items():
        assert grad.abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(grads_rows[name], grad, atol=1e-5, rtol=0, msg=name)


# --- when it is used -----------------------------------------------------------------------------


def test_a_supported_model_trains_padding_free():
    used, how = choose_padding_free(tiny_lm("qwen2", "eager"), DataSection(max_length=8), EXAMPLES,
                                    PAD)
    assert used
    assert how.startswith("padding-free batches: each step's conversations whole in rows of up "
                          "to 8 tokens")


def test_padding_free_is_off_when_asked_or_when_packing():
    model = tiny_lm("llama", "sdpa")
    assert choose_padding_free(model, DataSection(padding_free=False), EXAMPLES, PAD) == (False, "")
    assert choose_padding_free(model, DataSection(packing=True), EXAMPLES, PAD) == (False, "")


def test_attention_without_block_masks_falls_back_to_padded_batches():
    model = tiny_lm("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # takes padding masks only
    used, how = choose_padding_free(model, DataSection(max_length=8), EXAMPLES, PAD)
    assert not used
    assert how.startswith("the model's flash_attention_2 attention takes no block mask: padded "
                          "batches")


def test_a_model_that_ignores_the_block_mask_is_caught_by_the_check():
    import transformers

    class MaskBlind(transformers.LlamaForCausalLM):
        """Attends causally along the whole sequence of packed tokens: it drops the mask, the
        positions and the row layout it is given (given the positions, transformers would find
        the conversations from them)."""

        def forward(self, attention_mask=None, position_ids=None, row_layout=None, **inputs):
            return super().forward(**inputs)

    config = tiny_lm("llama", "sdpa").config
    config.initializer_range = 0.3  # attention sharp enough that the context changes the loss
    torch.manual_seed(0)
    model = MaskBlind(config)
    used, how = choose_padding_free(model, DataSection(max_length=8), EXAMPLES, PAD)
    assert not used
    assert model.config._attn_implementation == "sdpa"  # its own attention, for padded batches
    assert how.startswith("the model's loss changes on padding-free rows")
