#!/usr/bin/env bash
# The GPU check: tests/gpu on a CUDA machine, its log and JSON into $OUT (the device's return folder) or
# benchmarks/results/ (rows written after each case, so a call cut off at its limit keeps what ran). On an H200
# (2026-11-27) building the SD-1.5-shaped base took ~30 s and each case about a minute, so the 15 correctness cases
# need two device calls: pick them with -k (e.g. -k bf16, then -k fp16). The parts:
#   bash scripts/gpu_check.sh             every recipe in bf16 and fp16, generation and reload (tests/gpu/test_cuda.py)
#   bash scripts/gpu_check.sh memory      the 16 GB and 8 GB memory plans, capped (tests/gpu/test_memory_plans.py)
#   bash scripts/gpu_check.sh all         both
# Extra arguments go to pytest (e.g. -k fp16). Carry .whl (scripts/fetch_gpu_wheels.sh, run here first).
# Without CUDA the tests are skipped, which is what CI sees.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PART="${1:-correctness}"
shift || true
case "$PART" in
  correctness) tests=(tests/gpu/test_cuda.py) ;;
  memory) tests=(tests/gpu/test_memory_plans.py) ;;
  all) tests=(tests/gpu) ;;
  *) echo "unknown part $PART: correctness, memory or all" >&2; exit 2 ;;
esac
export GPU_CHECK_OUT="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$GPU_CHECK_OUT"
# shellcheck source=scripts/gpu_env.sh
source "$ROOT/scripts/gpu_env.sh"
cd "$ROOT"
gpu_report 2>&1 | tee "$GPU_CHECK_OUT/gpu-check-$PART.log"
"$PYTHON" -m pytest "${tests[@]}" -p no:cacheprovider -o addopts= -v -rA --durations=0 "$@" 2>&1 \
  | tee -a "$GPU_CHECK_OUT/gpu-check-$PART.log"
