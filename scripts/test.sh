#!/usr/bin/env bash
# Install dev dependencies and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TOKENIZERS_PARALLELISM=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${@:-tests}"
