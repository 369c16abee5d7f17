#!/usr/bin/env bash
# GPU runs of the 2-GPU machine (nvidia-h200-x2), in one or two `run` calls:
#   part A: issue 6 — GRPO 5 steps with --train-backend megatron --tensor-model-parallel-size 2
#           (colocated engines, weight sync every step) and the same run on the torch backend;
#           train tokens/s of both from MLflow.
#   part B: issue 4 — async vs sync loop (trainer on GPU 0, engine on GPU 1); issue 10 — train
#           throughput vs a bare HF loop, and one GRPO step's breakdown.
# The model is SmolLM2-135M's architecture and tokenizer with random weights (bench/assets): the
# real 538 MB checkpoint cannot travel to the device machine.
# Usage on the device: bash bench/gpu_session.sh A|B   (carry .whl)
set -o pipefail
part=${1:-A}
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false \
       MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_DEDUP_LOGS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
[ -f /tmp/smol/config.json ] || { rm -rf /tmp/smol; mkdir -p /tmp/smol; python3 -c "from bench._common import model_dir; print(model_dir('135m', '/tmp/smol'))"; }
COMMON=(--hf-checkpoint /tmp/smol --prompt-data examples/math_grpo/train.jsonl --input-key prompt --label-key label
        --apply-chat-template --rollout-batch-size 8 --n-samples-per-prompt 8 --global-batch-size 64
        --micro-batch-size 8 --rollout-max-response-len 128 --rollout-temperature 1.0
        --use-kl-loss --kl-loss-coef 0.001 --lr 1e-6 --custom-rm-path bench/assets/parity_rm.py)

# The device machine has no MLflow: metrics go to JSON lines (--mlflow-tracking-uri jsonl:PATH).
summary() { python3 -c "
import json, statistics as st, sys
rows = [json.loads(x)['metrics'] for x in open('/tmp/$1.jsonl') if '\"metrics\"' in x]
for k in sorted(rows[-1]):
    if k.startswith(('perf/', 'train/loss', 'train/kl_loss', 'rollout/weight_version', 'rollout/reward_mean')):
        v = [r[k] for r in rows if k in r]
        print(f'{k:40s} last {v[-1]:.4g}  median(steps 1..) {st.median(v[1:] or v):.4g}  ({len(v)} steps)')
"; }

if [ "$part" = C ]; then  # megatron TP=2 needs heads divisible by 2: SmolLM2-135M has 9, so a ~1.5B Llama config
  { rm -rf /tmp/l15; mkdir -p /tmp/l15; python3 -c "from bench._common import model_dir; model_dir('1.5b', '/tmp/l15', vocab_size=49152)"; }
  L15=(--hf-checkpoint /tmp/l15 --rollout-max-response-len 64 --update-weight-transport object_store --rollout-compile false
       --actor-num-gpus-per-node 2 --colocate --rollout-num-gpus 2 --num-rollout 4)
  timeout 160 python3 jobs/grpo.py "${COMMON[@]}" "${L15[@]}" --train-backend megatron --tensor-model-parallel-size 2 \
    --mlflow-tracking-uri jsonl:/tmp/megatron_tp2_1p5b.jsonl 2>&1 | grep -E "^step|Error|error" | tail -n 12 | tee "$OUT/megatron_tp2_1p5b.log"
  summary megatron_tp2_1p5b | tee -a "$OUT/megatron_tp2_1p5b.log"
  timeout 110 python3 jobs/grpo.py "${COMMON[@]}" "${L15[@]}" --train-backend torch --train-precision fp32 \
    --mlflow-tracking-uri jsonl:/tmp/torch_dp2_1p5b.jsonl 2>&1 | grep -E "^step|Error|error" | tail -n 12 | tee "$OUT/torch_dp2_1p5b.log"
  summary torch_dp2_1p5b | tee -a "$OUT/torch_dp2_1p5b.log"
  timeout 150 python3 bench/async_vs_sync.py --model /tmp/smol --steps 4 --results "$OUT/async_RESULTS.md" \
    --extra "--rollout-batch-size 8 --n-samples-per-prompt 8 --global-batch-size 64 --rollout-max-response-len 128 --rollout-num-gpus 1 --custom-rm-path bench/assets/parity_rm.py" \
    2>&1 | tail -n 8 | tee "$OUT/async_vs_sync.log"
elif [ "$part" = A ]; then
  timeout 280 python3 jobs/grpo.py "${COMMON[@]}" --train-backend megatron --tensor-model-parallel-size 2 \
    --actor-num-gpus-per-node 2 --colocate --rollout-num-gpus 2 --num-rollout 5 --mlflow-tracking-uri jsonl:/tmp/megatron_tp2.jsonl \
    --update-weight-transport object_store --rollout-compile false 2>&1 | grep -vE "^\(|Loading weights" | tail -n 25 | tee "$OUT/megatron_tp2.log"
  summary megatron_tp2 | tee -a "$OUT/megatron_tp2.log"
  timeout 200 python3 jobs/grpo.py "${COMMON[@]}" --train-backend torch --actor-num-gpus-per-node 2 --colocate \
    --rollout-num-gpus 2 --num-rollout 5 --mlflow-tracking-uri jsonl:/tmp/torch_dp2.jsonl --rollout-compile false 2>&1 \
    | grep -vE "^\(|Loading weights" | tail -n 25 | tee "$OUT/torch_dp2.log"
  summary torch_dp2 | tee -a "$OUT/torch_dp2.log"
else
  timeout 150 python3 bench/train_throughput.py 2>&1 | tail -n 30 | tee "$OUT/train_throughput.log"
  timeout 120 python3 bench/grpo_step_breakdown.py 2>&1 | tail -n 30 | tee "$OUT/grpo_step_breakdown.log"
  timeout 300 python3 bench/async_vs_sync.py --model /tmp/smol --steps 5 --results "$OUT/async_RESULTS.md" \
    --extra "--rollout-batch-size 8 --n-samples-per-prompt 8 --global-batch-size 64 --rollout-max-response-len 128 --rollout-num-gpus 1 --custom-rm-path bench/assets/parity_rm.py" \
    2>&1 | tail -n 30 | tee "$OUT/async_vs_sync.log"
fi
