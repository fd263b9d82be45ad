#!/usr/bin/env bash
# The whole GPU check on the GPU machine as it is (no network): install the carried wheels
# (benchmarks/gpu_wheels.sh made them), then run benchmarks/gpu_check.py into OUT (default $OUT).
#   bash benchmarks/gpu_check.sh [OUT] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
shift || true
python3 -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl
# The package from the working tree, under the image's jax (not installed: its pins stay out of it).
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -m benchmarks.gpu_check --out "$OUT_DIR" "$@" \
    2>&1 | tee "$OUT_DIR.log"
mkdir -p "$OUT_DIR" && mv "$OUT_DIR.log" "$OUT_DIR/gpu_check.log"
