#!/usr/bin/env bash
# The main job on a fresh machine: install, fetch SmolLM2-135M-Instruct, start a local Ray head,
# submit jobs/grpo.py with `ray job submit`, then print where to watch it and the final metrics.
# Usage: bash scripts/quickstart.sh [extra jobs/grpo.py flags, e.g. --num-rollout 10]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# venv, loopback-only Ray, Ray's token authentication (token in ~/.ray/auth_token, generated once)
. scripts/env.sh
[ -s ~/.ray/auth_token ] || ray get-auth-token --generate >/dev/null
MODEL=$(python -m slime_ray.models fetch smollm2-135m-instruct | tail -n 1)
echo "model: $MODEL"
if ray status --address 127.0.0.1:6379 >/dev/null 2>&1; then
  echo "using the Ray head already running at 127.0.0.1:6379"
else
  # the job agent's port is picked free: the default (52365) may be held by another local Ray
  agent_port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  ray start --head --port 6379 --num-cpus 4 --dashboard-host 127.0.0.1 --disable-usage-stats \
    --dashboard-agent-listen-port "$agent_port" >/dev/null \
    || { echo "ray start failed: is another Ray head on port 6379? stop it with: source scripts/env.sh && ray stop"; exit 1; }
fi
MLFLOW_URI="sqlite:///$PWD/mlflow.db"
SUBMISSION_ID="grpo_$(date +%Y%m%d_%H%M%S)"
job_status() {
  python -c "from ray.job_submission import JobSubmissionClient as C; print(C('$RAY_ADDRESS').get_job_status('$SUBMISSION_ID').value)" 2>/dev/null
}
set +e
for attempt in 1 2 3 4 5 6 7 8 9 10; do  # a fresh head's job agent can take a while to come up
ray job submit --submission-id "$SUBMISSION_ID" --working-dir . --runtime-env runtime_env.yaml -- \
  python jobs/grpo.py \
    --hf-checkpoint "$MODEL" \
    --prompt-data examples/math_grpo/train.jsonl --input-key prompt --label-key label \
    --apply-chat-template --rollout-shuffle \
    --rollout-batch-size 4 --n-samples-per-prompt 4 --global-batch-size 16 --micro-batch-size 4 \
    --num-rollout 3 --rollout-max-response-len 64 --rollout-temperature 0.7 \
    --advantage-estimator grpo --use-kl-loss --kl-loss-coef 0.001 --lr 1e-6 \
    --mlflow-tracking-uri "$MLFLOW_URI" --run-name "$SUBMISSION_ID" "$@"
  [ -n "$(job_status)" ] && break
  echo "job submission not accepted yet (attempt $attempt); retrying in 10 s"; sleep 10
done
set -e
STATUS=$(job_status || echo UNKNOWN)
echo
echo "job $SUBMISSION_ID: $STATUS"
echo "Ray dashboard:  http://127.0.0.1:8265  (source scripts/env.sh && ray job status $SUBMISSION_ID)"
echo "Stop the Ray head when done: source scripts/env.sh && ray stop"
echo "MLflow UI:      .venv/bin/mlflow ui --backend-store-uri $MLFLOW_URI --host 127.0.0.1 --port 5000"
python -m slime_ray.tracking summary --tracking-uri "$MLFLOW_URI" --run-name "$SUBMISSION_ID" || true
[ "$STATUS" = "SUCCEEDED" ]
