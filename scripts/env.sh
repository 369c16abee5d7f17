# Source this before talking to the local Ray cluster from a shell:  source scripts/env.sh
# (venv, loopback-only Ray, token auth, the head's addresses)
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$_here/.venv/bin/activate"
# RAY_worker_niceness=0: a head started from here runs the job's actors at the driver's priority
# (Ray's default, 15, lets any other process take the CPU from the engine and the trainer)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token TOKENIZERS_PARALLELISM=false \
       MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_worker_niceness=0
export RAY_ADDRESS=http://127.0.0.1:8265   # ray job submit / status / logs; `ray status` uses --address 127.0.0.1:6379
