"""Pretrain stage vs a minimal plain-PyTorch loop: tokens/s of both and their ratio, in one run.

    .venv/bin/python benchmarks/pretrain_throughput.py [--preset tiny] [--steps 60] [--batch 16] [--seq 128]

Both train the same preset model from the same initial weights on the same packed blocks with the
same batch, sequence length and AdamW settings. The stage runs through `rlhf run pretrain` code
(registry, metrics, progress bar, shared loop); its rate is measured between the first and last
logged step (registry timestamps), so set-up and the final publish are excluded, as they are for the
plain loop. No resume states are written in the timed window (checkpoint.every_steps > steps).
Target: the stage reaches ≥ 0.95 of the plain loop.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.models import build_from_preset
from pipeline.registry import Registry
from stages import pretrain

ROOT = Path(__file__).resolve().parents[1]


def stage_tokens_per_s(home: Path, overrides: list[str]) -> tuple[float, object]:
    config = load_config(pretrain.Config, ROOT / "configs/tiny/pretrain.yaml", overrides)
    registry = Registry(home)
    run = pretrain.run(config, registry)
    db = sqlite3.connect(home / "registry.db")
    rows = db.execute("SELECT step, time FROM metrics WHERE run_id = ? AND name = 'loss' "
                      "ORDER BY step", (run.id,)).fetchall()
    (first_step, first_time), (last_step, last_time) = rows[0], rows[-1]
    tokens = (last_step - first_step) * config.train.batch_size * config.data.seq_len
    return tokens / (last_time - first_time), config


def plain_tokens_per_s(config, home: Path, steps: int) -> float:
    """The same training as a bare loop: no registry, no accelerate, no logging."""
    from pipeline.data.formats import read_text_corpus
    from pipeline.world.cache import world_file
    from pipeline.tokenizer import load_tokenizer

    registry = Registry(home)
    run = registry.runs("pretrain")[-1]
    tokenizer = load_tokenizer(run.model_path)
    texts = read_text_corpus([str(world_file(registry, config.data.world, "pretrain.jsonl"))])
    blocks = pretrain.pack_blocks(texts, tokenizer, config.data.seq_len)
    model = build_from_preset(config.model.preset, tokenizer, config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr,
                                  weight_decay=config.train.weight_decay, betas=(0.9, 0.95))
    batch_size = config.train.batch_size
    generator = torch.Generator().manual_seed(0)
    model.train()
    started = None
    for step in range(steps):
        if step == 1:
            started = time.perf_counter()  # same window as the stage: first to last step
        idx = torch.randint(len(blocks), (batch_size,), generator=generator)
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    return (steps - 1) * batch_size * config.data.seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    overrides = [f"model.preset={args.preset}", f"train.max_steps={args.steps}",
                 f"train.batch_size={args.batch}", f"data.seq_len={args.seq}",
                 f"checkpoint.every_steps={args.steps + 1}", "train.eval_batches=1"]
    with tempfile.TemporaryDirectory() as tmp:
        stage_rate, config = stage_tokens_per_s(Path(tmp), overrides)
        plain_rate = plain_tokens_per_s(config, Path(tmp), args.steps)
    print(f"threads={torch.get_num_threads()} preset={args.preset} steps={args.steps} "
          f"batch={args.batch} seq={args.seq}")
    print(f"stage  tokens/s: {stage_rate:10.0f}")
    print(f"plain  tokens/s: {plain_rate:10.0f}")
    print(f"ratio stage/plain: {stage_rate / plain_rate:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
