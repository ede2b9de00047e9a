#!/usr/bin/env bash
# Every GPU check of the training loop and feature extraction in one run (one H100/H200, under 8 minutes), one table at the end.
#   bash benchmarks/gpu_check.sh --json results.json   # GPU; the JSON is rewritten after every stage
#   bash benchmarks/gpu_check.sh --smoke                # CPU, tiny configs: checks that the script works
# Extra arguments go to benchmarks/gpu_check.py (--only e2e,profile  --budget-s 470  --h16-grad-checkpointing).
# Stages, most important first: b16, e2e, profile, equality, data, features, l16, h16, b16_cudagraphs,
# features_compiled.
# Works from an install or a bare checkout; no network.
set -euo pipefail
cd "$(dirname "$0")/.."
# train/ installs as flexpredict_zoo.train (pyproject's package-dir), so a bare checkout on PYTHONPATH cannot import it;
# without an install, assemble the installed layout in a temporary folder (a copy: 4 MB, nothing changed here)
if ! python -c "import flexpredict_zoo.train" 2>/dev/null; then
  layout="$(mktemp -d)"; trap 'rm -rf "$layout"' EXIT
  cp -rL flexpredict_zoo "$layout/" && rm -rf "$layout/flexpredict_zoo/train" && cp -r train "$layout/flexpredict_zoo/train"
  export PYTHONPATH="$layout${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1
# nvidia-smi line for the record (the table names the card too)
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python benchmarks/gpu_check.py "$@"
