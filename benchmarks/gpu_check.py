"""GPU figures for the closing note: one process, every stage, one output folder.

    bash benchmarks/gpu_check.sh OUT_DIR        (about 8 minutes on one H200)

For two model shapes, the `base` preset (~134M) and a ~0.4B Llama shape in the proportions of
0.5B-class models (hidden 896, 24 layers, 14 heads, 2 KV heads), every stage in bf16 autocast,
without and with gradient checkpointing: tokens/s, MFU (model FLOPs, 6N + attention, over the
card's dense bf16 peak; recomputation not counted), peak GPU memory; PPO episodes/s with its time
split. Then a sharded (`runtime.sharding=fsdp`) pretrain on one GPU under torchrun as a smoke run,
killed after its first state and resumed. Everything goes to OUT_DIR/gpu_check.json and is
printed. Rates come from the registry's per-step metrics, skipping the first logged step
(allocator warm-up). Runs past the time budget are recorded as skipped, not silently dropped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.registry import Registry
from stages import STAGES

# Dense bf16 tensor-core peaks from the spec sheets (SXM parts).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
BUDGET_S = 330  # the stages; the sharded smoke run adds about 2 minutes

# A 0.5B-class shape (Qwen2.5-0.5B's proportions) on the project's 32k tokenizer: ~0.4B.
HALF_B_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=1024)

# Each stage: its base config with a short step budget.
PLAN = {
    "pretrain": ["train.max_steps=12", "train.log_every=2", "checkpoint.every_steps=1000",
                 "train.batch_size=16", "train.grad_accum=1", "data.seq_len=1024"],
    "sft": ["train.max_steps=10", "train.log_every=2", "checkpoint.every_steps=1000",
            "train.grad_accum=1", "eval.n_prompts=16", "train.eval_batches=2"],
    "reward": ["train.max_steps=10", "train.log_every=2", "checkpoint.every_steps=1000",
               "train.grad_accum=1", "normalize.prompts=16"],
    "ppo": ["train.max_steps=4", "checkpoint.every_steps=1000", "eval.n_prompts=16"],
}


def steady_mean(series: list[tuple[int, float]], skip: int = 1) -> float:
    values = [v for _, v in series[skip:]] or [v for _, v in series]
    return sum(values) / len(values)


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((flops for card, flops in PEAK_BF16_FLOPS.items() if card in name), 989e12)


def flops_per_token(n_params: int, layers: int, hidden: int, seq: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention's 12·layers·hidden·seq (PaLM,
    appendix B)."""
    return 6 * n_params + 12 * layers * hidden * seq


def run_stage(name: str, registry: Registry, overrides: list[str], label: str, out: Path) -> dict:
    module = STAGES[name].load()
    config = load_config(module.Config, Path("configs/base") / f"{name}.yaml",
                         PLAN[name] + overrides)
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    run = module.run(config, registry, restart=True)
    metrics = registry.metrics(run.id)
    figures = {"run": run.id, "wall_s": round(time.time() - started, 1),
               "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if "tokens_per_s" in metrics:
        figures["tokens_per_s"] = steady_mean(metrics["tokens_per_s"])
        model_config = json.loads((Path(run.model_path) / "config.json").read_text())
        seq = config.data.seq_len if name == "pretrain" else config.data.max_length
        n_params = _parameter_count(run.model_path)
        per_token = flops_per_token(n_params, model_config["num_hidden_layers"],
                                    model_config["hidden_size"], seq)
        figures.update(params=n_params, mfu=figures["tokens_per_s"] * per_token / peak_flops())
    if name == "ppo":
        for key in ("episodes_per_s", "time_generate", "time_score", "time_update"):
            if key in metrics:
                figures[key] = steady_mean(metrics[key])
        split = [figures.get(k, 0.0) for k in ("time_generate", "time_score", "time_update")]
        if sum(split):
            figures["generate_share"] = split[0] / sum(split)
    print(f"{label}: {json.dumps(figures)}", flush=True)
    (out / f"{label}.json").write_text(json.dumps(figures, indent=1))
    return figures


def _parameter_count(model_dir: str) -> int:
    from safetensors import safe_open
    total = 0
    for shard in Path(model_dir).glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for key in handle.keys():
                total += int(torch.Size(handle.get_slice(key).get_shape()).numel())
    return total


def half_b_model(registry: Registry, out: Path) -> str:
    """A randomly initialized 0.5B-class Llama with the base pretrain run's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = registry.lookup("pretrain:latest").model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**HALF_B_SHAPE, vocab_size=len(tokenizer), tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    path = out / "llama-0.5b-class"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def shape_runs(shape: str, registry: Registry, out: Path, deadline: float) -> dict:
    """Every stage of one shape, gradient checkpointing off then on. The next stage starts from
    `STAGE:latest`, the run with checkpointing, which trained exactly as the one without."""
    results = {}
    source = [] if shape == "base" else [f"model.source={half_b_model(registry, out)}"]
    parents = {"pretrain": source, "sft": [], "reward": ["model.source=sft:latest"],
               "ppo": ["model.policy=sft:latest"]}
    for name in PLAN:
        for checkpointing in (False, True):
            label = f"{shape}/{name}/{'checkpointing' if checkpointing else 'plain'}"
            if time.time() > deadline:
                results[label] = {"skipped": "over the time budget"}
                continue
            overrides = parents[name] + [f"train.gradient_checkpointing={str(checkpointing).lower()}"]
            try:
                results[label] = run_stage(name, registry, overrides, label.replace("/", "-"),
                                           out)
            except Exception as err:  # one run failing must not hide the others' figures
                results[label] = {"error": f"{type(err).__name__}: {err}"}
                print(f"{label}: FAILED {err}", flush=True)
    return results


def sharded_smoke_run(out: Path) -> dict:
    """Sharded pretrain on one GPU under torchrun: killed once its first state is committed,
    then resumed to the end."""
    home = out / "sharded-home"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "1", "-m", "pipeline.commands.cli", "--home", str(home), "run", "pretrain",
               "--config", "configs/base/pretrain.yaml", "runtime.sharding=fsdp",
               "train.max_steps=20", "train.grad_accum=1", "checkpoint.every_steps=10"]
    started = time.time()
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
    while not list(home.glob("runs/pretrain-*/state/step-10/manifest.json")):
        if first.poll() is not None or time.time() - started > 120:
            break
        time.sleep(0.5)
    killed = first.poll() is None
    if killed:
        os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    resumed = subprocess.run(command, capture_output=True, text=True)
    return {"killed_after_state": killed, "resumed": "resuming" in resumed.stderr,
            "returncode": resumed.returncode, "wall_s": round(time.time() - started, 1),
            "stderr_tail": resumed.stderr[-800:]}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    started = time.time()
    registry = Registry(out / "home")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    # The base shape gets the first 40% of the budget, the larger one the rest.
    for shape, share in (("base", 0.4), ("0.5b", 1.0)):
        results[shape] = shape_runs(shape, registry, out, started + share * BUDGET_S)
    results["sharded_smoke"] = sharded_smoke_run(out)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
