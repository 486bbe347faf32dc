#!/usr/bin/env bash
# Wheels a lent GPU machine lacks (it has CUDA torch, transformers and accelerate but no registry access): saved in
# the git-ignored .whl/ so a device run can carry them. See benchmarks/README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$ROOT/.whl"
"$ROOT/.venv/bin/python" -m pip download --quiet --no-deps --dest "$ROOT/.whl" \
  diffusers==0.42.1 peft==0.21.2 huggingface_hub==2.4.0 httpx2==2.16.2 hf-xet==1.8.0 bitsandbytes==0.50.2
ls -1 "$ROOT/.whl"
