#!/usr/bin/env bash
# Install dev dependencies and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
# RAY_worker_niceness=0: the tests' local clusters run their actors as the jobs' own clusters do (slime_ray.job.init_ray)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TOKENIZERS_PARALLELISM=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_worker_niceness=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${@:-tests}"
