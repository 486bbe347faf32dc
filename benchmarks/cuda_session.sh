#!/usr/bin/env bash
# The CUDA speed benchmark cut into parts that each fit one device call (10 minutes) of a 15-minute lease:
#   a: the two-stage defaults and DreamBooth with prior preservation end to end (the 3x claim), plus the reference step
#   b: the memory options (full: 8-bit Adam + checkpointing; LoRA: checkpointing) and regional compilation
#   c: the other baselines' step costs (60 steps each: ms/step, not end to end)
#   d: SDXL (sdxl-random, 1024 px, bf16): two-stage LoRA with the 24 GB plan (checkpointing + 8-bit Adam) end to end,
#      the README's targets (training <= 3 min on an H100-class GPU, peak <= 21 GiB)
#   e: SDXL step costs and peaks (30 steps each): LoRA without the memory options, full U-Net + 8-bit Adam +
#      checkpointing, textual inversion, DreamBooth-LoRA with prior preservation
# On the device:  bash benchmarks/cuda_session.sh a   (carry .whl, made here by scripts/fetch_gpu_wheels.sh)
# Smoke run on a CPU:  MODEL=tiny STEPS=5 bash benchmarks/cuda_session.sh a   (SDXL: SDXL_MODEL=sdxl-tiny ... d)
set -euo pipefail
PART="${1:?usage: cuda_session.sh a|b|c|d|e}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${MODEL:-sd15-random}"
RESULTS="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$RESULTS"
# shellcheck source=scripts/gpu_env.sh
source "$ROOT/scripts/gpu_env.sh"
gpu_report
steps=()
if [ -n "${STEPS:-}" ]; then steps=(--steps "$STEPS"); fi
speed() { "$PYTHON" "$ROOT/benchmarks/speed.py" --model "$MODEL" "$@"; }
case "$PART" in
  a) speed "${steps[@]}" --recipes "two_stage (full)" "two_stage (lora)" "dreambooth + prior" \
       --json "$RESULTS/speed-$MODEL-a.json" ;;
  b) speed "${steps[@]}" --recipes "two_stage (full) + 8-bit Adam + checkpointing" "two_stage (lora) + checkpointing" \
       "two_stage (full) + compile" --reference-repeats 3 --json "$RESULTS/speed-$MODEL-b.json" ;;
  c) speed --steps "${STEPS:-60}" --recipes textual_inversion dreambooth dreambooth_lora --reference-repeats 3 \
       --json "$RESULTS/speed-$MODEL-c.json" ;;
  d) MODEL="${SDXL_MODEL:-sdxl-random}"
     speed "${steps[@]}" --recipes "two_stage (lora) + checkpointing + 8-bit Adam" \
       --json "$RESULTS/speed-$MODEL-d.json" ;;
  e) MODEL="${SDXL_MODEL:-sdxl-random}"
     speed --steps "${STEPS:-30}" --class-images 4 --recipes "two_stage (lora)" \
       "two_stage (full) + 8-bit Adam + checkpointing" textual_inversion "dreambooth_lora + prior" \
       --json "$RESULTS/speed-$MODEL-e.json" ;;
  *) echo "unknown part $PART: use a, b, c, d or e" >&2; exit 2 ;;
esac
