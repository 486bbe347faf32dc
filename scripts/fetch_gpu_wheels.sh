#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, saved in the git-ignored .whl/ for a device run to carry (scripts/gpu_check.sh
# and benchmarks/cuda_session.sh install them there). That machine has Python 3.12, CUDA 13 torch 2.11,
# transformers 5.17, accelerate 1.15, huggingface_hub 1.33, safetensors, numpy, Pillow and pytest, and no registry.
#  - diffusers and peft at the project's pins; bitsandbytes for 8-bit Adam (the T4 plan), cut to the CUDA 13.x and CPU
#    libraries: the whole wheel (43 MB) with the tracked tree (43 MB) is over a device call's 64 MiB.
#  - Not huggingface_hub 2: transformers 5.17 refuses to import beside a huggingface_hub >= 2 (it checks at import),
#    and the machine's 1.33 is what diffusers 0.42 (>= 1.32) and the engine's training path need. Pushing to the Hub
#    (hub 2's httpx2) is never run there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BNB_CUDA="${BNB_CUDA:-13}"  # the device's CUDA major (torch 2.11+cu130): bitsandbytes loads the nearest 13.x library
WHL="$ROOT/.whl"
rm -rf "$WHL" && mkdir -p "$WHL"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --dest "$WHL" diffusers==0.42.1 peft==0.21.2 bitsandbytes==0.50.2 2> >(grep -v "^WARNING: Location" >&2)
"$PYTHON" - "$WHL" "$BNB_CUDA" <<'PY'
"""Rewrite the bitsandbytes wheel without the native libraries of other CUDA / ROCm versions (RECORD updated)."""
import re
import sys
import zipfile
from pathlib import Path

folder, cuda = Path(sys.argv[1]), sys.argv[2]
[wheel] = folder.glob("bitsandbytes-*.whl")
slim = wheel.with_suffix(".slim")
kept = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda}\d)\.so$")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    dropped = {info.filename for info in source.infolist()
               if re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", info.filename) and not kept.search(info.filename)}
    for info in source.infolist():
        if info.filename in dropped:
            continue
        data = source.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines() if line.split(b",")[0].decode() not in dropped)
        target.writestr(info, data)
slim.replace(wheel)
print(f"{wheel.name}: kept the cpu and cuda{cuda}.x libraries, dropped {len(dropped)}")
PY
ls -1 "$WHL"
# What one device call may carry: the tracked tree plus the wheels, under 64 MiB.
tracked=$(git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 du -cb 2>/dev/null) | tail -1 | cut -f1)
wheels=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
echo "tracked files $((tracked / 1048576)) MiB + wheels $((wheels / 1048576)) MiB (a device call carries at most 64 MiB)"
if [ $((tracked + wheels)) -ge $((64 * 1048576)) ]; then echo "too large for one device call" >&2; exit 1; fi
