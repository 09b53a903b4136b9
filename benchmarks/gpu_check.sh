#!/usr/bin/env bash
# GPU figures on one machine with CUDA (about 8 minutes on one H200): installs the project into
# .venv when missing, then runs every stage briefly for the base preset and a 0.5B-class shape,
# without and with gradient checkpointing, and a sharded smoke run; writes OUT_DIR/gpu_check.json.
#   bash benchmarks/gpu_check.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q 'torch>=2.6'
  .venv/bin/python -m pip install -q -e .
fi
export RLHF_NO_PROGRESS=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || true
.venv/bin/python benchmarks/gpu_check.py "$out"
