"""A model's forward pass on a packed batch: the real tokens only, attention in rows.

A packed batch (`pipeline.data.packing`: the reward stage's shared prompts, SFT's padding-free
rows) places blocks of tokens into right-padded rows, each block attending only to itself through
a block attention mask; padded sequences (PPO's episodes: left-padded prompts, right-padded
answers) are rows of one block each (`sequences_layout`). Attention is the one layer that needs
the rows; every other layer works token by token, and would spend its compute on the padding as
well (a quarter of the tokens of the tiny reward stage's batches, half of PPO's). So
`packed_forward` runs the model on the real tokens as one sequence (1, T), and the model's
attention, swapped for `row_attention`, gathers the queries, keys and values into the rows,
applies the block mask there with sdpa, and puts the outputs back in token order.

The swap goes through transformers' AttentionInterface: the model's attention implementation
becomes `ROW_ATTENTION` for good, not for one call, because gradient checkpointing recomputes the
layers during the backward pass, after the call has returned. For any call without a row layout,
`ROW_ATTENTION` is sdpa, masks included, so the model computes what it computed before. A model
whose attention does not go through the interface keeps its own; its packed outputs then differ
from separate sequences, which the stages check before they pack (and fall back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.packing import PAD_SEGMENT, block_attention_mask
from pipeline.models import inner_model

ROW_ATTENTION = "packed_rows"
# The implementations a model may come with for `packed_forward` to take over: those whose masks
# and outputs sdpa reproduces. Flash attention keeps its own implementation (no block mask).
PACKABLE_ATTENTION = ("sdpa", "eager", ROW_ATTENTION)


@dataclass(frozen=True)
class RowLayout:
    """Where the real tokens of a (rows, width) packed batch sit.

    gather:  (rows·width,) for each row position, the index of its token among the T real tokens
             (padding points at token 0: its outputs are dropped and no real token attends to it);
    scatter: (T,) for each real token, its row position (row·width + column);
    mask:    (rows, 1, width, width) bool, True where a query may attend to a key.
    """
    rows: int
    width: int
    gather: torch.Tensor
    scatter: torch.Tensor
    mask: torch.Tensor

    def in_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(1, T, ...) values of the real tokens -> (rows, width, ...), padding holding token 0's."""
        return values[0].index_select(0, self.gather).unflatten(0, (self.rows, self.width))


def row_layout(batch: dict) -> RowLayout:
    """The layout of a packed batch with attention_mask, block_ids and segment_ids (B, L)."""
    rows, width = batch["attention_mask"].shape
    scatter = batch["attention_mask"].flatten().nonzero().squeeze(1)
    gather = torch.zeros(rows * width, dtype=torch.long, device=scatter.device)
    gather[scatter] = torch.arange(len(scatter), device=scatter.device)
    mask = block_attention_mask(batch["block_ids"], batch["segment_ids"])
    return RowLayout(rows, width, gather, scatter, mask)


def sequences_layout(attention_mask: torch.Tensor) -> RowLayout:
    """The layout of padded sequences (B, L), left- or right-padded (or both): each row one block
    of its real tokens."""
    blocks = torch.where(attention_mask.bool(), 0, PAD_SEGMENT)
    return row_layout({"attention_mask": attention_mask, "block_ids": blocks,
                       "segment_ids": blocks})


def token_index(layout: RowLayout, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Indices among the real tokens of the tokens at (rows, columns) of the packed batch."""
    return layout.gather[rows * layout.width + columns]


def row_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  row_layout: RowLayout | None = None, **kwargs):
    """Attention of the real tokens' (1, heads, T, dim) states computed in `row_layout`'s rows,
    returned as (1, T, heads, dim) like every attention implementation; without a layout, sdpa."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if row_layout is None:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                    **kwargs)

    def in_rows(states: torch.Tensor) -> torch.Tensor:  # (1, heads, T, dim) -> (rows, heads, width, dim)
        return (states[0].index_select(1, row_layout.gather)
                .unflatten(1, (row_layout.rows, row_layout.width)).transpose(0, 1))

    output, _ = sdpa(module, in_rows(query), in_rows(key), in_rows(value), row_layout.mask,
                     dropout=dropout, scaling=scaling, **kwargs)  # (rows, width, heads, dim)
    return output.flatten(0, 1).index_select(0, row_layout.scatter).unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ROW_ATTENTION, row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


_register()


def use_row_attention(model) -> None:
    """Swap the model's attention for `ROW_ATTENTION` (once; it stays, see the module docstring)."""
    inner = inner_model(model)
    if inner.config._attn_implementation != ROW_ATTENTION:
        inner.set_attn_implementation(ROW_ATTENTION)


def packed_forward(model, batch: dict, layout: RowLayout | None = None, **kwargs):
    """The model's output on the real tokens of a packed batch, as one sequence (1, T) in row
    order. The batch's input_ids, position_ids and (when it has them) labels are (B, L) tensors;
    `kwargs` go to the model as they are (e.g. `logits_to_keep`, indices among the T tokens).

    A causal LM's labels stay right: the model shifts them along the sequence, so a token's
    target is the next real token, which in a packed batch is its block's next token or the
    next block's first, whose label is ignored (`pack_padding_free`).
    """
    layout = layout or row_layout(batch)
    use_row_attention(model)

    def tokens(values: torch.Tensor) -> torch.Tensor:
        return values.flatten().index_select(0, layout.scatter).unsqueeze(0)

    per_token = {name: tokens(batch[name]) for name in ("input_ids", "position_ids", "labels")
                 if name in batch}
    # The 4D mask is only there so that transformers builds none of its own for T tokens; the
    # attention takes the layout's.
    return model(**per_token, attention_mask=layout.mask, row_layout=layout, use_cache=False,
                 **kwargs)
