"""The supervised training loop shared by pretrain, sft and reward.

A stage hands `fit` its model, a function that returns the micro-batches of a given optimizer step,
and a loss function. The batches of step N depend only on (seed, N), so a resumed run sees exactly
the samples an uninterrupted run would, with no data-loader state to save.
"""

from __future__ import annotations

import math
import time
import zlib
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch

from pipeline.models import enable_gradient_checkpointing, own_storage
from pipeline.precision import memory_line
from pipeline.runtime import StageRun
from pipeline.sharding import prepare


def step_indices(n_examples: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Example indices for global optimizer step `step`: epochs are seeded permutations."""
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n_examples)
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        take = min(per_step - len(out), n_examples - offset)
        out.extend(order[offset: offset + take].tolist())
    return np.asarray(out)


def micro_batch_indices(stage_run: StageRun, n_examples: int, step: int) -> list[np.ndarray]:
    """This process's micro-batches of step `step` (global batch = batch × accum × processes)."""
    train = stage_run.config.train
    procs = stage_run.accelerator.num_processes
    rank = stage_run.accelerator.process_index
    indices = step_indices(n_examples, step, train.batch_size * train.grad_accum * procs,
                           stage_run.config.seed)
    per_micro = train.batch_size * procs
    return [indices[i * per_micro:(i + 1) * per_micro][rank::procs] for i in range(train.grad_accum)]


def warmup_cosine(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warmup to lr, then cosine decay to lr·min_ratio at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(stage_run: StageRun, model: torch.nn.Module):
    train = stage_run.config.train
    params = [p for p in model.parameters() if p.requires_grad]
    fused = stage_run.accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                                  betas=(0.9, 0.95), fused=fused)
    scheduler = warmup_cosine(optimizer, train.warmup_steps, train.max_steps, train.min_lr_ratio)
    return optimizer, scheduler


def fit(stage_run: StageRun, model, tokenizer, *,
        batches_for_step: Callable[[int], list[tuple[np.ndarray, dict]]],
        loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
        eval_fn: Callable[[torch.nn.Module], dict] | None = None,
        tokens_in: Callable[[dict], int] = lambda batch: 0,
        items_in: Callable[[dict], int] | None = None,
        desc: str = "train") -> dict:
    """Train to `train.max_steps`, saving resume states; returns the final eval metrics.

    `batches_for_step(step)` → [(example_indices, batch_tensors), ...], one per micro-batch.
    `loss_fn(model, batch)` → (loss, metrics to average over the step).
    `items_in(batch)`: how many items (answer tokens, say) a micro-batch's loss is the mean of.
    Given, each micro-batch weighs by its share of the items of the whole global batch, so the
    step's loss is the mean over all of them, however they are split into micro-batches and
    processes; without it, every micro-batch weighs the same.
    """
    accelerator = stage_run.accelerator
    train = stage_run.config.train
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    stage_run.say(memory_line(desc, {"model": model}, [model]))
    own_storage(model)  # the same numerics whether the weights were loaded or built
    stage_run.shard(model)  # before the optimizer, which must hold the sharded parameters
    optimizer, scheduler = make_optimizer(stage_run, model)
    model, optimizer = prepare(accelerator, model, optimizer)
    # The module each optimizer trains (`StageRun.save_state`): a sharded state needs it.
    trains = {"main": model}
    if stage_run.resume:
        stage_run.load_state({"main": optimizer}, {"main": scheduler}, optimizer_modules=trains)
    model.train()
    bar = stage_run.progress(train.max_steps, desc)
    for step in range(stage_run.start_step, train.max_steps):
        started = time.perf_counter()
        micro = batches_for_step(step)
        weights = micro_batch_weights(accelerator, [batch for _, batch in micro], items_in)
        sums: dict[str, float] = {}
        tokens = 0
        for i, (indices, batch) in enumerate(micro):
            sync = i == len(micro) - 1
            with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                loss, metrics = loss_fn(model, to_device(batch, accelerator.device))
                accelerator.backward(loss * weights[i])
            for name, value in {"loss": loss.detach(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + value * weights[i]
            tokens += tokens_in(batch)
        if train.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % train.log_every == 0 or step + 1 == train.max_steps:
            seen = np.concatenate([idx for idx, _ in micro])
            elapsed = time.perf_counter() - started
            values = mean_over_processes(accelerator, sums)
            values.update(lr=scheduler.get_last_lr()[0], batch_crc=zlib.crc32(seen.tobytes()),
                          step_time=elapsed)
            if tokens:
                values["tokens_per_s"] = tokens * accelerator.num_processes / elapsed
            stage_run.log(step + 1, values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        bar.update(1)
        if eval_fn and train.eval_every and (step + 1) % train.eval_every == 0 \
                and step + 1 < train.max_steps:
            stage_run.log(step + 1, evaluate(accelerator.unwrap_model(model), eval_fn))
        if (step + 1) % stage_run.config.checkpoint.every_steps == 0 and step + 1 < train.max_steps:
            stage_run.save_state(step + 1, models={"model": model}, optimizers={"main": optimizer},
                                 schedulers={"main": scheduler}, extra={}, tokenizer=tokenizer,
                                 optimizer_modules=trains)
    bar.close()
    final = evaluate(accelerator.unwrap_model(model), eval_fn) if eval_fn else {}
    if final:
        stage_run.log(train.max_steps, final)
    return final


def micro_batch_weights(accelerator, batches: list[dict],
                        items_in: Callable[[dict], int] | None) -> list[float]:
    """The factor of each micro-batch's mean loss: its items over the global batch's items, times
    the number of processes (whose gradients are averaged, not summed)."""
    if items_in is None:
        return [1.0 / len(batches)] * len(batches)
    counts = [items_in(batch) for batch in batches]
    total = torch.tensor(float(sum(counts)), device=accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    total_items = max(total.item(), 1.0)
    return [count * accelerator.num_processes / total_items for count in counts]


def mean_over_processes(accelerator, sums: dict) -> dict[str, float]:
    """Step metrics averaged over all processes (each saw an equal share of the global batch)."""
    names = list(sums)
    local = torch.stack([torch.as_tensor(sums[n], dtype=torch.float32, device=accelerator.device)
                         for n in names])
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="mean")
    return dict(zip(names, local.tolist()))


def evaluate(model, eval_fn) -> dict:
    """`eval_fn(model)` in eval mode without gradients (`model` unwrapped: no DDP forward hooks)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = eval_fn(model)
    model.train(was_training)
    return result


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
