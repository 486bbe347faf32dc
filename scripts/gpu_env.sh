# Sourced by the device scripts (scripts/gpu_check.sh, benchmarks/cuda_session.sh) with ROOT set: puts the wheels
# carried in .whl/ (scripts/fetch_gpu_wheels.sh) ahead of the machine's own packages, unless the pinned versions are
# already importable (a CPU smoke run in the project's venv). gpu_report says what runs.
PYTHON="${PYTHON:-python3}"
SITE="${GPU_SITE:-/tmp/site}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_VERBOSITY=error
PINNED="import diffusers, peft, bitsandbytes; assert (diffusers.__version__, peft.__version__, bitsandbytes.__version__) \
== ('0.42.1', '0.21.2', '0.50.2')"
if ! "$PYTHON" -c "$PINNED" 2>/dev/null; then
  if ! ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run scripts/fetch_gpu_wheels.sh here and carry .whl" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$ROOT"/.whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
gpu_report() {
  "$PYTHON" - <<'PY'
import importlib.metadata as metadata
import sys

import torch

names = ("torch", "transformers", "accelerate", "diffusers", "peft", "huggingface_hub", "bitsandbytes", "safetensors")
def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


print(f"python {sys.version.split()[0]};", "; ".join(f"{name} {version(name)}" for name in names))
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("no CUDA device")
PY
}
