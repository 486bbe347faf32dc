#!/usr/bin/env bash
# Set up (first run only) and start the app: http://127.0.0.1:7860
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" requirements.txt
cd "$ROOT"
exec .venv/bin/python app.py "$@"
