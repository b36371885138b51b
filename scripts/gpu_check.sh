#!/usr/bin/env bash
# The GPU check in one command: tests on the GPU, the bench suites on CUDA, one short real training.
#   scripts/gpu_check.sh [OUT_DIR] [extra args for scripts/gpu_check.py, e.g. --quick --device cpu]
# Writes OUT_DIR/gpu_check.json (default results/gpu_check); under 8 minutes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu_check}"
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "${PYTHON:-python}" scripts/gpu_check.py --out "$out" "$@"
