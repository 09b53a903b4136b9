"""The shared supervised loop's pure pieces: the batches of a step, the schedule, and the weight of
each micro-batch's loss, against hand-computed values."""

from __future__ import annotations

from operator import itemgetter

import numpy as np
import pytest
import torch

from pipeline.loop import micro_batch_weights, step_indices, warmup_cosine


class FakeAccelerator:
    """Stands for `num_processes` processes whose counts sum to `total` in an all-reduce."""

    def __init__(self, num_processes: int, others: float = 0.0):
        self.num_processes = num_processes
        self.device = torch.device("cpu")
        self.others = others

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.others


def items(count: int) -> dict:
    return {"count": count}


def test_without_counts_every_micro_batch_weighs_the_same():
    assert micro_batch_weights(FakeAccelerator(1), [items(3), items(1)], None) == [0.5, 0.5]


def test_counts_weigh_micro_batches_by_their_share_of_the_items():
    count = itemgetter("count")
    assert micro_batch_weights(FakeAccelerator(1), [items(3), items(1)], count) == [0.75, 0.25]
    # Two processes, 4 items here and 12 on the other: 3·2/16 and 1·2/16 (DDP then halves).
    assert micro_batch_weights(FakeAccelerator(2, others=12), [items(3), items(1)], count) == \
        [0.375, 0.125]


def test_step_indices_cover_each_epoch_once_and_depend_on_the_seed():
    first_epoch = np.concatenate([step_indices(10, step, 5, seed=0) for step in range(2)])
    assert sorted(first_epoch) == list(range(10))
    assert list(step_indices(10, 1, 5, 0)) == list(step_indices(10, 1, 5, 0))
    assert list(step_indices(10, 0, 10, 0)) != list(step_indices(10, 0, 10, 1))
    crossing = step_indices(10, 1, 6, seed=0)  # items 6..11: the end of epoch 0, start of 1
    assert len(crossing) == 6


def test_warmup_then_cosine_to_the_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup=2, total=6, min_ratio=0.1)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # warmup 1/2, 2/2; then 0.1 + 0.9·(1 + cos(π·k/4))/2 for k = 0..3
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.86820, 0.55, 0.23180], abs=1e-5)


def test_own_storage_moves_misaligned_weights_into_aligned_allocations():
    # A weight loaded from safetensors can sit 32 bytes into a buffer, as this one does.
    from pipeline.models import own_storage

    layer = torch.nn.Linear(4, 2)
    buffer = torch.arange(16, dtype=torch.float32)
    layer.weight.data = buffer[8:16].view(2, 4)
    assert layer.weight.data_ptr() % 64 == 32
    own_storage(layer)
    assert layer.weight.data_ptr() % 64 == 0
    assert layer.weight.tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert isinstance(layer.weight, torch.nn.Parameter) and layer.weight.requires_grad
