#!/usr/bin/env bash
# Every GPU check of the training loop and feature extraction in one run (one H100/H200, under 6 minutes), one table at the end.
#   bash benchmarks/gpu_check.sh                 # GPU
#   bash benchmarks/gpu_check.sh --smoke         # CPU, tiny configs (< 2 min): checks that the script works
# Extra arguments go to benchmarks/gpu_check.py (--only b16,equality  --budget-s 330  --h16-grad-checkpointing
# --json results.json). Assumes the checkout is importable (PYTHONPATH=. or an editable install); no network.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export HF_HUB_OFFLINE=1
# nvidia-smi line for the record (the table names the card too)
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python benchmarks/gpu_check.py "$@"
