# Source this before talking to the local Ray cluster from a shell:  source scripts/env.sh
# (venv, loopback-only Ray, token auth, the head's addresses)
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$_here/.venv/bin/activate"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token TOKENIZERS_PARALLELISM=false \
       MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
export RAY_ADDRESS=http://127.0.0.1:8265   # ray job submit / status / logs; `ray status` uses --address 127.0.0.1:6379
