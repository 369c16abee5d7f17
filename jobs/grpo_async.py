"""GRPO post-training with generation overlapped with training — slime's ``train_async.py`` on Ray.

What it trains: the same as ``jobs/grpo.py`` (policy in ``--hf-checkpoint``, prompts of
``--prompt-data``, rewards of ``--rm-type`` / ``--custom-rm-path``, group-normalised GRPO
advantages, Shao et al. 2024, arXiv:2402.03300). A background thread generates rollout N+1 (up to
``--async-buffer-size`` rollouts ahead) while the Ray actor group trains on rollout N; the weights
reach the engines every ``--update-weights-interval`` steps.

Departures: training is off-policy by one or more weight versions. Every token records the version
that produced it; the producer waits for weights rather than generate rollouts more than
``--max-staleness`` versions behind, and groups older than that are dropped before training
(``rollout/stale_dropped_*``). ``--use-tis`` reweights by the trainer / rollout log-prob ratio.
Unlike slime, a sync does not wait for the in-flight rollout: each engine pauses, loads, flushes
and resumes, so every response comes from one version (requests in flight finish first).
``--colocate`` is refused (nothing can overlap when trainer and engines take turns).

Launch (local head started with ``ray start --head``)::

    ray job submit --working-dir . -- python jobs/grpo_async.py \\
        --hf-checkpoint smollm2-135m-instruct --prompt-data examples/math_grpo/train.jsonl \\
        --input-key prompt --label-key label --apply-chat-template \\
        --rollout-batch-size 4 --n-samples-per-prompt 4 --global-batch-size 16 --num-rollout 3 \\
        --rollout-max-response-len 64 --async-buffer-size 1 --max-staleness 1 --use-tis
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from slime_ray import checkpoint, job  # noqa: E402
from slime_ray.args import config_to_params, parse_args  # noqa: E402
from slime_ray.placement import create_placement  # noqa: E402
from slime_ray.rollout.async_loop import RolloutProducer, WeightSyncer, check_async_args, filter_stale  # noqa: E402
from slime_ray.rollout.manager import RolloutManager, build_train_table  # noqa: E402
from slime_ray.tracking import Tracker, format_progress_line  # noqa: E402
from slime_ray.train.actor_group import RayTrainGroup  # noqa: E402


def main(argv: list[str] | None = None) -> job.JobResult:
    job.setup_logging()
    cfg, args = parse_args(argv)                                    # bad flags stop here
    check_async_args(args)
    _, prompts = job.prepare_inputs(args)                           # bad model / data stop here
    job.init_ray(args)
    tracker = Tracker(tracking_uri=args.mlflow_tracking_uri, experiment_name=args.mlflow_experiment_name,
                      run_name=args.run_name, params=config_to_params(args),
                      use_tensorboard=args.use_tensorboard, tensorboard_dir=args.tensorboard_dir)
    data_source = job.make_data_source(args, prompts)
    placement = create_placement(args)
    actor = RayTrainGroup(args, placement)
    rollout = RolloutManager(args, data_source, job.start_rollout_app(args, placement))
    producer = RolloutProducer(rollout, args, args.num_rollout).start()   # generates ahead
    sync = WeightSyncer(actor, rollout.client, producer)
    metrics: dict[str, float] = {}
    for rollout_id in range(args.num_rollout):                      # rollout_id = trainer version
        t = job.StepTimer()
        _, groups, rollout_metrics = t.run("train_wait", producer.get)
        groups, stale_metrics = filter_stale(groups, rollout_id, args.max_staleness)
        table, table_metrics = build_train_table(args, groups)
        t0 = time.perf_counter()
        train_metrics = t.run("train", actor.train, rollout_id, ray.put(table)) if groups else {}
        overlap = producer.busy.overlap(t0, time.perf_counter()) / max(time.perf_counter() - t0, 1e-9)
        if args.save and args.save_interval and (rollout_id + 1) % args.save_interval == 0:
            t.run("save", checkpoint.save, args, actor, rollout_id, data_source, rollout_id + 1, tracker.run_id)
        sync_metrics = sync(rollout_id + 1) if (rollout_id + 1) % args.update_weights_interval == 0 else {}
        metrics = {**rollout_metrics, **stale_metrics, **table_metrics, **train_metrics, **t.times,
                   **sync_metrics, "perf/overlap_ratio": overlap, "train/weight_version": float(rollout_id),
                   "rollout/engine_weight_version": float(producer.engine_version)}
        tracker.log_metrics(metrics, step=rollout_id)
        print(format_progress_line(rollout_id, metrics), flush=True)
    producer.stop()
    tracker.finish()
    return job.JobResult(metrics=metrics, actor=actor, rollout=rollout, run_id=tracker.run_id, placement=placement)


if __name__ == "__main__":
    from slime_ray.validation import run_cli

    sys.exit(run_cli(main))
