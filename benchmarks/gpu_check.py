"""GPU figures for the closing note: one process, every stage, one output folder.

    bash benchmarks/gpu_check.sh OUT_DIR        (about 8 minutes on one H200)

Records, into OUT_DIR/gpu_check.json and printed: pretrain tokens/s and MFU for the base preset
(~125M) at bf16, SFT tokens/s, reward-model pairs/s, PPO episodes/s with its time split, and the
peak GPU memory of each stage. Rates come from the registry's per-step metrics, skipping the first
steps (compilation and allocator warm-up).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.registry import Registry
from stages import STAGES

H200_BF16_DENSE_FLOPS = 989e12  # spec sheet, dense bf16 tensor-core peak

# Each stage: its base config with a short step budget (kept under ~8 minutes in all).
PLAN = {
    "pretrain": ["train.max_steps=60", "train.log_every=10", "checkpoint.every_steps=1000",
                 "train.batch_size=16", "train.grad_accum=1", "data.seq_len=1024"],
    "sft": ["train.max_steps=40", "train.log_every=10", "checkpoint.every_steps=1000",
            "eval.n_prompts=32"],
    "reward": ["train.max_steps=40", "train.log_every=10", "checkpoint.every_steps=1000"],
    "ppo": ["train.max_steps=8", "checkpoint.every_steps=1000", "eval.n_prompts=32"],
}


def steady_mean(series: list[tuple[int, float]], skip: int = 1) -> float:
    values = [v for _, v in series[skip:]] or [v for _, v in series]
    return sum(values) / len(values)


def run_stage(name: str, registry: Registry, out: Path) -> dict:
    module = STAGES[name].load()
    config = load_config(module.Config, Path("configs/base") / f"{name}.yaml", PLAN[name])
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    run = module.run(config, registry, restart=True)
    metrics = registry.metrics(run.id)
    figures = {"run": run.id, "wall_s": round(time.time() - started, 1),
               "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if "tokens_per_s" in metrics:
        figures["tokens_per_s"] = steady_mean(metrics["tokens_per_s"])
    if name == "pretrain":
        from pipeline.models import PRESETS
        n_params = _parameter_count(run.model_path)
        seq = config.data.seq_len
        shape = PRESETS[config.model.preset]
        # 6N per token for the matmuls plus attention's 12·layers·hidden·seq (PaLM appendix B)
        flops_per_token = 6 * n_params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq
        figures["params"] = n_params
        figures["mfu"] = figures["tokens_per_s"] * flops_per_token / H200_BF16_DENSE_FLOPS
    if name == "reward" and "pairs_per_s" in metrics:
        figures["pairs_per_s"] = steady_mean(metrics["pairs_per_s"])
    if name == "ppo":
        for key in ("episodes_per_s", "time_generate", "time_score", "time_update"):
            if key in metrics:
                figures[key] = steady_mean(metrics[key])
        split = [figures.get(k, 0.0) for k in ("time_generate", "time_score", "time_update")]
        if sum(split):
            figures["generate_share"] = split[0] / sum(split)
    print(f"{name}: {json.dumps(figures)}", flush=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=1))
    return figures


def _parameter_count(model_dir: str) -> int:
    from safetensors import safe_open
    total = 0
    for shard in Path(model_dir).glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                total += int(torch.Size(shape).numel())
    return total


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    registry = Registry(out / "home")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in PLAN:
        try:
            results[name] = run_stage(name, registry, out)
        except Exception as err:  # one stage failing must not hide the others' figures
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"{name}: FAILED {err}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
