#!/usr/bin/env bash
# GPU runs on the 2-GPU machine (nvidia-h200-x2), one `run` call per part (each < 10 minutes):
#   part M: issue 6 — GRPO 5 steps, --train-backend megatron --tensor-model-parallel-size 2 (colocated
#           engines, weight sync every step), then the same run on the torch backend (FSDP2, 2 ranks),
#           same model and precision (fp32); train tokens/s of both from the metrics.
#   part A: issue 4 — async vs sync loop, trainer on GPU 0 and engine on GPU 1 (bench/async_vs_sync.py),
#           which also prints the sync step broken into rollout / log-probs / train / sync / other.
#   part E: issue 10 — embedded engine fast vs eager (GPU 0 and GPU 1 at once), weight sync (IPC and
#           NCCL vs a raw broadcast), torch backend vs a bare HF training loop, one-process step breakdown.
# Models have random weights, SmolLM2-135M's architecture and tokenizer (bench/assets): the real 538 MB
# checkpoint cannot travel to the device machine. "135m-tp2" is the same model with 8 heads of 72
# (4 KV heads): TP=2 cannot split SmolLM2's 9 heads.
# Usage on the device:  bash bench/gpu_session.sh M|A|A2|A3|A4|C|E|F|G|H|I|J|K|L|N|N2|N3|O|O2     (carry .whl for M and A; .twhl for E and F:
# transformers 5.24, the version of this machine, which the engine's decode loop was written against)
set -o pipefail
part=${1:-M}
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false \
       MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_DEDUP_LOGS=1
if [ -d .whl ] && [ ! -d .site/ray ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
fi
if [ -d .gwhl ] && [ ! -d .site/ray ]; then  # .whl without megatron-core/cryptography + transformers 5.24 (fits one carry)
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .gwhl/*.whl || exit 1
fi
if [ -d .twhl ] && [ ! -d .tsite/transformers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .tsite .twhl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/.tsite:$PWD/.site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
mk() { [ -f "$2/config.json" ] || { rm -rf "$2"; mkdir -p "$2"; python3 -c "from bench._common import model_dir; model_dir('$1', '$2')" >/dev/null; }; }
COMMON=(--prompt-data examples/math_grpo/train.jsonl --input-key prompt --label-key label
        --apply-chat-template --rollout-batch-size 8 --n-samples-per-prompt 8 --global-batch-size 64
        --micro-batch-size 8 --rollout-max-response-len 128 --rollout-temperature 1.0
        --use-kl-loss --kl-loss-coef 0.001 --lr 1e-6 --custom-rm-path bench/assets/parity_rm.py)

# The device machine has no MLflow: metrics go to JSON lines (--mlflow-tracking-uri jsonl:PATH).
summary() { python3 -c "
import json, statistics as st
rows = [json.loads(x) for x in open('/tmp/$1.jsonl')]
rows = [r for r in rows if 'train/loss' in r.get('metrics', {})]
ms = [r['metrics'] for r in rows]
print('steps done:', len(ms))
for k in sorted(ms[-1]):
    if k.startswith(('perf/', 'train/loss', 'train/kl_loss', 'rollout/weight_version', 'rollout/reward_mean', 'rollout/total_tokens')):
        v = [m[k] for m in ms if k in m]
        print(f'{k:40s} last {v[-1]:.4g}  median(steps 1..) {st.median(v[1:] or v):.4g}  ({len(v)} steps)')
ts = [r['timestamp_ms'] for r in rows]
if len(ts) > 1:
    print('wall s/step (steps 1..): median', st.median((b - a) / 1000 for a, b in zip(ts, ts[1:])))
"; }

# J's GRPO job: compiled engine, colocated with --offload-rollout, 8 prompts x 8 samples x 128 tokens (one GPU)
colocated_job() {  # $1: timeout in seconds
  R=(--hf-checkpoint /tmp/smol --colocate --offload-rollout --actor-num-gpus-per-node 1 --rollout-num-gpus 1
     --num-rollout 5 --recompute-activations --use-dynamic-batch-size --max-tokens-per-gpu 8192)
  CUDA_VISIBLE_DEVICES=0 timeout "$1" python3 jobs/grpo.py "${COMMON[@]}" "${R[@]}" --mlflow-tracking-uri jsonl:/tmp/engine_job.jsonl 2>&1 \
    | grep -E "^step|rror|Traceback|ecompil" | tail -n 20 | tee "$OUT/engine_job.log"
  summary engine_job | tee -a "$OUT/engine_job.log"
}
# bench/grpo_overhead.py on J's job shape, run in folder $1 (a tree of this repo), $2 steps, the first $3 warm-up
overhead() {
  X="--colocate ${OFFLOAD---offload-rollout} --actor-num-gpus-per-node 1 --rollout-num-gpus 1 --recompute-activations
     --use-dynamic-batch-size --max-tokens-per-gpu 8192 --use-kl-loss --kl-loss-coef 0.001
     --custom-rm-path bench/assets/parity_rm.py --mlflow-tracking-uri jsonl:/tmp/overhead.jsonl"
  name=$([ "$1" = . ] && echo this || basename "$1")${OFFLOAD+_nooffload}
  (root=$PWD; cd "$1" && CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$root/.tsite:$root/.site:$PWD timeout 250 python3 bench/grpo_overhead.py \
     --model /tmp/smol --steps "$2" --warmup "$3" --threads 4 --prompts-per-step 8 --group-size 8 --max-new-tokens 128 \
     --extra "$X" 2>&1 | grep -E "^  [a-z]|^step|^median|rror" | tail -n 40 | tee "$OUT/overhead_$name.log")
  python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1  # a run cut by its timeout leaves workers
}

if [ "$part" = M ]; then
  mk 135m-tp2 /tmp/s8
  R=(--hf-checkpoint /tmp/s8 --actor-num-gpus-per-node 2 --colocate --rollout-num-gpus 2 --num-rollout 5
     --rollout-compile false --update-weight-transport object_store)
  timeout 300 python3 jobs/grpo.py "${COMMON[@]}" "${R[@]}" --train-backend megatron --tensor-model-parallel-size 2 \
    --mlflow-tracking-uri jsonl:/tmp/megatron_tp2.jsonl 2>&1 | grep -E "^step|rror|Traceback" | tail -n 20 | tee "$OUT/megatron_tp2.log"
  summary megatron_tp2 | tee -a "$OUT/megatron_tp2.log"
  timeout 200 python3 jobs/grpo.py "${COMMON[@]}" "${R[@]}" --train-backend torch --train-precision fp32 \
    --mlflow-tracking-uri jsonl:/tmp/torch_fsdp2.jsonl 2>&1 | grep -E "^step|rror|Traceback" | tail -n 20 | tee "$OUT/torch_fsdp2.log"
  summary torch_fsdp2 | tee -a "$OUT/torch_fsdp2.log"
elif [ "$part" = A ]; then
  mk 135m /tmp/smol
  X="--rollout-batch-size 16 --n-samples-per-prompt 8 --global-batch-size 128 --micro-batch-size 16 --rollout-max-response-len 128 --use-kl-loss --kl-loss-coef 0.001 --rollout-num-gpus 1 --actor-num-gpus-per-node 1 --rollout-compile false --torch-num-threads 4 --custom-rm-path bench/assets/parity_rm.py"
  timeout 330 python3 bench/async_vs_sync.py --model /tmp/smol --steps 6 --results "$OUT/async_RESULTS.md" --extra "$X" \
    2>&1 | tail -n 12 | tee "$OUT/async_vs_sync.log"
  if ! grep -q "speed-up" "$OUT/async_vs_sync.log"; then  # the NCCL transport failed? the loops, over the object store
    timeout 240 python3 bench/async_vs_sync.py --model /tmp/smol --steps 5 --results "$OUT/async_RESULTS.md" \
      --extra "$X --update-weight-transport object_store" 2>&1 | tail -n 12 | tee "$OUT/async_vs_sync_os.log"
  fi
elif [ "$part" = A2 ]; then  # A with generation and training of similar length: one engine batch of 128, fp32 training
  mk 135m /tmp/smol
  X="--rollout-batch-size 16 --n-samples-per-prompt 8 --global-batch-size 128 --micro-batch-size 16 --rollout-max-response-len 128 --use-kl-loss --kl-loss-coef 0.001 --rollout-num-gpus 1 --actor-num-gpus-per-node 1 --rollout-compile false --rollout-max-batch-size 128 --train-precision fp32 --recompute-activations --torch-num-threads 4 --custom-rm-path bench/assets/parity_rm.py"
  timeout 300 python3 bench/async_vs_sync.py --model /tmp/smol --steps 4 --results "$OUT/async_RESULTS.md" --extra "$X" \
    2>&1 | tail -n 12 | tee "$OUT/async_vs_sync.log"
elif [ "$part" = C ]; then  # one GPU: GRPO job, colocated, --train-compile true vs false (with recompute)
  mk 135m /tmp/smol
  R=(--hf-checkpoint /tmp/smol --colocate --actor-num-gpus-per-node 1 --rollout-num-gpus 1 --num-rollout 4
     --rollout-compile false --recompute-activations --use-dynamic-batch-size --max-tokens-per-gpu 8192)
  for c in true false; do
    timeout 200 python3 jobs/grpo.py "${COMMON[@]}" "${R[@]}" --train-compile $c \
      --mlflow-tracking-uri jsonl:/tmp/compile_$c.jsonl 2>&1 | grep -E "^step|rror|Traceback" | tail -n 12 | tee "$OUT/compile_$c.log"
    summary compile_$c | tee -a "$OUT/compile_$c.log"
  done
elif [ "$part" = G ]; then  # one GPU: GRPO job, colocated + --offload-rollout, compiled engine (auto: on for CUDA)
  mk 135m /tmp/smol            # carry .gwhl (ray + transformers 5.24, the decode loop's version)
  R=(--hf-checkpoint /tmp/smol --colocate --offload-rollout --actor-num-gpus-per-node 1 --rollout-num-gpus 1
     --num-rollout 5 --recompute-activations --use-dynamic-batch-size --max-tokens-per-gpu 8192)
  timeout 330 python3 jobs/grpo.py "${COMMON[@]}" "${R[@]}" --mlflow-tracking-uri jsonl:/tmp/engine_job.jsonl 2>&1 \
    | grep -E "^step|rror|Traceback|ecompil" | tail -n 20 | tee "$OUT/engine_job.log"
  summary engine_job | tee -a "$OUT/engine_job.log"
elif [ "$part" = H ]; then  # final check, 2 GPUs at once (carry .gwhl): F's engine bench (GPU 0), G's job (GPU 1)
  mk 135m /tmp/smol
  ( CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/engine_throughput.py --model /tmp/smol --mode fast --repeats 3 \
      --varying 40,200 --json "$OUT/engine_fast.json" > "$OUT/engine_fast.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/engine_throughput.py --model /tmp/smol --mode eager --repeats 1 \
      --batches 256 --json "$OUT/engine_eager.json" > "$OUT/engine_eager.log" 2>&1 ) &
  R=(--hf-checkpoint /tmp/smol --colocate --offload-rollout --actor-num-gpus-per-node 1 --rollout-num-gpus 1
     --num-rollout 5 --recompute-activations --use-dynamic-batch-size --max-tokens-per-gpu 8192)
  CUDA_VISIBLE_DEVICES=1 timeout 330 python3 jobs/grpo.py "${COMMON[@]}" "${R[@]}" --mlflow-tracking-uri jsonl:/tmp/engine_job.jsonl 2>&1 \
    | grep -E "^step|rror|Traceback|ecompil" | tail -n 20 | tee "$OUT/engine_job.log"
  summary engine_job | tee -a "$OUT/engine_job.log"
  wait
  grep -v "Loading\|Writing" "$OUT/engine_fast.log" "$OUT/engine_eager.log" | tail -n 14
  python3 bench/engine_throughput.py --merge "$OUT/engine_fast.json" "$OUT/engine_eager.json" 2>&1 | tail -n 8
elif [ "$part" = I ] || [ "$part" = N ]; then  # one H200: H's engine bench with GRPO-shaped calls (8 samples per
  # prompt: shared prefill); N = the same with 2 repeats (the re-check after the grad-mode fix)
  mk 135m /tmp/smol
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/engine_throughput.py --model /tmp/smol --mode fast --repeats $([ "$part" = N ] && echo 2 || echo 3) \
    --group-size 8 --varying 40,200 --json "$OUT/engine_fast.json" > "$OUT/engine_fast.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/engine_throughput.py --model /tmp/smol --mode eager --repeats 1 \
    --group-size 8 --batches 256 --json "$OUT/engine_eager.json" > "$OUT/engine_eager.log" 2>&1
  grep -v "Loading\|Writing" "$OUT/engine_fast.log" "$OUT/engine_eager.log" | tail -n 14
  python3 bench/engine_throughput.py --merge "$OUT/engine_fast.json" "$OUT/engine_eager.json" 2>&1 | tail -n 8
elif [ "$part" = J ]; then  # one H200: H's GRPO job (compiled engine, 8 samples per prompt), colocated
  mk 135m /tmp/smol
  colocated_job 500
elif [ "$part" = K ]; then  # one H200, final check of the code (carry .gwhl): J's job, colocated sync, training
  mk 135m /tmp/smol
  colocated_job 270
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 bench/weight_sync.py --reps 5 --models 135m 2>&1 | tail -n 8 | tee "$OUT/weight_sync.log"
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/train_throughput.py --compile both > "$OUT/train_throughput.log" 2>&1
  grep -v "Loading\|Writing" "$OUT/train_throughput.log" | tail -n 25
elif [ "$part" = L ]; then  # one H200: where a GRPO step's time goes (bench/grpo_overhead.py), J's job shape;
  mk 135m /tmp/smol            # with OLD=<folder of an older tree>, that tree's step after this one's
  for tree in . $OLD; do       # (the older tree gets this tree's bench/grpo_overhead.py copied in first)
    overhead "$tree" 7 3
  done
elif [ "$part" = N2 ]; then  # one H200: L's step breakdown of J's job, this tree only, 5 steps (steady: 3 and 4)
  mk 135m /tmp/smol
  overhead . 5 2
elif [ "$part" = O ] || [ "$part" = O2 ]; then  # one H200: the engine's release / retake alone (bench/engine_offload.py), then N2
  mk 135m /tmp/smol
  [ "$part" = O2 ] && CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/weight_sync.py --reps 5 --models 135m 2>&1 | tail -n 8 \
    | tee "$OUT/weight_sync.log"  # O2: the colocated sync first (FlatLayout.valid changed)
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/engine_offload.py --model /tmp/smol --reps 5 2>&1 | tail -n 8 \
    | tee "$OUT/engine_offload.log"
  overhead . 5 2
elif [ "$part" = N3 ]; then  # N2, then the same job colocated without --offload-rollout (engine keeps its memory)
  mk 135m /tmp/smol
  overhead . 5 2
  OFFLOAD= overhead . 5 2
elif [ "$part" = A4 ]; then  # A3's async vs sync alone (after the async loop's transport fix), same config
  mk 135m /tmp/smol
  X="--rollout-batch-size 16 --n-samples-per-prompt 8 --global-batch-size 128 --micro-batch-size 16 --rollout-max-response-len 128 --use-kl-loss --kl-loss-coef 0.001 --rollout-num-gpus 1 --actor-num-gpus-per-node 1 --rollout-compile false --train-precision fp32 --recompute-activations --train-compile false --torch-num-threads 4 --custom-rm-path bench/assets/parity_rm.py"
  timeout 290 python3 bench/async_vs_sync.py --model /tmp/smol --steps 5 --results "$OUT/async_RESULTS.md" --extra "$X" \
    2>&1 | tail -n 12 | tee "$OUT/async_vs_sync.log"
elif [ "$part" = F ]; then  # engine (GPU 0, profiled) vs eager, then fast with $F2 (default --graph-steps 0) (GPU 1)
  mk 135m /tmp/smol
  CUDA_VISIBLE_DEVICES=0 timeout 420 python3 bench/engine_throughput.py --model /tmp/smol --mode fast --repeats 3 \
    --profile --varying 40,200,256,100 --json "$OUT/engine_fast.json" > "$OUT/engine_fast.log" 2>&1 &
  ( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 bench/engine_throughput.py --model /tmp/smol --mode eager --repeats 1 \
      --json "$OUT/engine_eager.json" > "$OUT/engine_eager.log" 2>&1
    CUDA_VISIBLE_DEVICES=1 timeout 200 python3 bench/engine_throughput.py --model /tmp/smol --mode fast ${F2:---graph-steps 0} \
      --batches 256 --repeats 3 --varying "" --json "$OUT/engine_nofused.json" > "$OUT/engine_nofused.log" 2>&1 )
  wait
  grep -v "Loading\|Writing" "$OUT/engine_fast.log" | tail -n 30; tail -n 4 "$OUT/engine_eager.log" "$OUT/engine_nofused.log"
  python3 bench/engine_throughput.py --merge "$OUT/engine_fast.json" "$OUT/engine_eager.json" 2>&1 | tail -n 8
elif [ "$part" = A3 ]; then  # generation ~ training: A's engine batches of 64, fp32 + recompute training
  mk 135m /tmp/smol            # (A2's training, now without the separate old-log-prob forward); first the
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/train_throughput.py --compile both > "$OUT/train_throughput.log" 2>&1
  grep -v "Loading\|Writing" "$OUT/train_throughput.log" | tail -n 25   # torch backend (eager, compiled) vs bare HF
  X="--rollout-batch-size 16 --n-samples-per-prompt 8 --global-batch-size 128 --micro-batch-size 16 --rollout-max-response-len 128 --use-kl-loss --kl-loss-coef 0.001 --rollout-num-gpus 1 --actor-num-gpus-per-node 1 --rollout-compile false --train-precision fp32 --recompute-activations --torch-num-threads 4 --custom-rm-path bench/assets/parity_rm.py"
  timeout 330 python3 bench/async_vs_sync.py --model /tmp/smol --steps 6 --results "$OUT/async_RESULTS.md" --extra "$X" \
    2>&1 | tail -n 12 | tee "$OUT/async_vs_sync.log"
else
  mk 135m /tmp/smol
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 bench/engine_throughput.py --model /tmp/smol --mode fast --repeats 2 \
    --json "$OUT/engine_fast.json" > "$OUT/engine_fast.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 240 python3 bench/engine_throughput.py --model /tmp/smol --mode eager --repeats 1 \
    --json "$OUT/engine_eager.json" > "$OUT/engine_eager.log" 2>&1
  wait
  tail -n 15 "$OUT/engine_fast.log" "$OUT/engine_eager.log"
  python3 bench/engine_throughput.py --merge "$OUT/engine_fast.json" "$OUT/engine_eager.json" 2>&1 | tail -n 20 | tee "$OUT/engine_merge.log"
  timeout 150 python3 bench/weight_sync.py --reps 5 2>&1 | tail -n 20 | tee "$OUT/weight_sync.log"
  timeout 120 python3 bench/weight_sync.py --reps 5 --buffer-mb 128 --models 1.5b 2>&1 | tail -n 12 | tee "$OUT/weight_sync_128.log"
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/train_throughput.py > "$OUT/train_throughput.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/grpo_step_breakdown.py > "$OUT/grpo_step_breakdown.log" 2>&1
  wait
  tail -n 25 "$OUT/train_throughput.log" "$OUT/grpo_step_breakdown.log"
fi
