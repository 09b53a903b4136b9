"""A packed batch's forward pass on its real tokens only (`pipeline.packed`): where the tokens go,
and what the model's swapped attention does outside packed calls and under gradient
checkpointing. That packed outputs equal separate sequences is checked per stage, in
test_padding_free.py (SFT) and test_shared_prompt.py (reward)."""

from __future__ import annotations

import torch

from pipeline.data.packing import pack_padding_free, pad_labeled
from pipeline.packed import ROW_ATTENTION, packed_forward, row_layout, token_index
from pipeline.tokenizer import IGNORE_INDEX as X
from tests.unit.tiny_models import loss_and_grads, tiny_family_model

PAD = 1
# In rows of 8: the 6-token conversation alone (one padding), the 4- and 3-token ones together.
EXAMPLES = [{"input_ids": [5, 6, 7, 8, 9, 2], "labels": [X, X, X, 8, 9, 2]},
            {"input_ids": [3, 4, 2], "labels": [X, 4, 2]},
            {"input_ids": [10, 11, 12, 2], "labels": [X, X, 12, 2]}]


def tiny_lm():
    return tiny_family_model("llama", "sdpa", "AutoModelForCausalLM", pad_token_id=PAD)


def test_row_layout_exact_indices():
    layout = row_layout(pack_padding_free(EXAMPLES, width=8, pad_id=PAD))  # rows of 7 tokens
    assert (layout.rows, layout.width) == (2, 7)
    assert layout.scatter.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13]
    assert layout.gather.tolist() == [0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 10, 11, 12]
    assert layout.mask.shape == (2, 1, 7, 7)
    # row 1, column 4: the 3-token conversation's first token, the 11th real token
    assert token_index(layout, torch.tensor([1]), torch.tensor([4])).tolist() == [10]


def test_the_packed_forward_runs_the_real_tokens_only():
    seen = []
    model = tiny_lm()
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    packed_forward(model, pack_padding_free(EXAMPLES, width=8, pad_id=PAD))
    assert seen[0].tolist() == [[5, 6, 7, 8, 9, 2, 10, 11, 12, 2, 3, 4, 2]]


def test_after_the_swap_unpacked_calls_compute_what_sdpa_computed():
    model = tiny_lm().eval()
    padded = pad_labeled(EXAMPLES, PAD)
    before = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    packed_forward(model, pack_padding_free(EXAMPLES, width=8, pad_id=PAD))
    assert model.config._attn_implementation == ROW_ATTENTION
    after = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(after[real], before[real], atol=1e-6, rtol=0)


def test_gradient_checkpointing_recomputes_the_packed_attention():
    # The checkpointed layers run again during the backward pass, after the call has returned:
    # they must still attend in rows, or the gradients would be those of one long sequence.
    batch = pack_padding_free(EXAMPLES, width=8, pad_id=PAD)

    def loss_of(model):
        return packed_forward(model, batch).loss

    plain = tiny_lm()
    loss, grads = loss_and_grads(plain, loss_of)
    checkpointed = tiny_lm()
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()
    loss_checkpointed, grads_checkpointed = loss_and_grads(checkpointed, loss_of)
    assert loss_checkpointed == loss
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)
