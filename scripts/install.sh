#!/usr/bin/env bash
# Install slime_ray into ./.venv (idempotent). Usage: bash scripts/install.sh [--dev]
# torch is installed FIRST and pinned on machines without a GPU, so nothing later pulls a
# multi-GB CUDA build: `pip install torch==2.13.0` takes the local CPU build on our machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==${SLIME_RAY_TORCH_VERSION:-2.13.0}" \
      || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
python -m pip install -q -e ".${extra}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
python -c "import slime_ray, ray, torch, transformers; print('slime_ray', slime_ray.__version__, '| ray', ray.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
