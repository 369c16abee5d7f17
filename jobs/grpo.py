"""GRPO (and PPO-family) post-training, synchronous loop — slime's ``train.py`` on Ray.

What it trains: the policy in ``--hf-checkpoint`` on the prompts of ``--prompt-data``, rewarded
by ``--rm-type`` / ``--custom-rm-path``. Each rollout step: the Serve engines sample
``--n-samples-per-prompt`` responses for ``--rollout-batch-size`` prompts, rewards are normalised
per group (GRPO, Shao et al. 2024, arXiv:2402.03300), the Ray actor group trains
``--num-steps-per-rollout`` PPO-clip steps, and the new weights reach every engine (weight
version + 1).

Departures from the paper: as slime, the KL to the reference is a loss term (``--use-kl-loss``,
low_var_kl by default) rather than a reward penalty, and the loss is a per-sample token mean
unless ``--loss-agg-mode`` says otherwise.

Launch (local head started with ``ray start --head``)::

    ray job submit --working-dir . -- python jobs/grpo.py \\
        --hf-checkpoint smollm2-135m-instruct --prompt-data examples/math_grpo/train.jsonl \\
        --input-key prompt --label-key label --apply-chat-template \\
        --rollout-batch-size 4 --n-samples-per-prompt 4 --global-batch-size 16 --num-rollout 3 \\
        --rollout-max-response-len 64 --rollout-temperature 0.7 --use-kl-loss --kl-loss-coef 0.001
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from slime_ray import checkpoint, job  # noqa: E402
from slime_ray.args import config_to_params, parse_args  # noqa: E402
from slime_ray.fault import TrainRecovery  # noqa: E402
from slime_ray.placement import create_placement  # noqa: E402
from slime_ray.rollout.eval import Evaluator  # noqa: E402
from slime_ray.rollout.manager import RolloutManager, build_train_table  # noqa: E402
from slime_ray.tracking import Tracker, format_progress_line  # noqa: E402
from slime_ray.train.actor_critic import create_training_models, train_step  # noqa: E402


def main(argv: list[str] | None = None) -> job.JobResult:
    job.setup_logging()
    cfg, args = parse_args(argv)                                    # bad flags stop here
    _, prompts = job.prepare_inputs(args)                           # bad model / data stop here
    resume = checkpoint.find_resume(args)                           # bad --load stops here
    evaluator = Evaluator.from_args(args)                           # None without --eval-prompt-data
    job.init_ray(args)
    tracker = Tracker(tracking_uri=args.mlflow_tracking_uri, experiment_name=args.mlflow_experiment_name,
                      run_name=args.run_name, params=config_to_params(args),
                      run_id=resume and resume.meta.get("mlflow_run_id"),
                      use_tensorboard=args.use_tensorboard, tensorboard_dir=args.tensorboard_dir)
    data_source = job.make_data_source(args, prompts)
    placement = create_placement(args)
    actor, critic = create_training_models(args, placement)         # critic iff ppo
    rollout = RolloutManager(args, data_source, job.start_rollout_app(args, placement))
    rollout.client.idle_during_sync = True                          # no request is in flight during a sync
    rollout_id = checkpoint.restore(resume, actor, data_source, rollout.client)  # engines get its weights
    recovery = TrainRecovery(args, argv, placement)
    metrics: dict[str, float] = {}
    if evaluator and rollout_id == 0 and not args.skip_eval_before_train:
        tracker.log_metrics(job.run_async(evaluator.evaluate(rollout.group_generate)), step=0)
    while rollout_id < args.num_rollout:
        t = job.StepTimer()
        groups, rollout_metrics = job.run_async(rollout.generate_rollout(rollout_id))
        table, table_metrics = build_train_table(args, groups)
        try:
            job.offload_rollout(args, rollout.client, t)             # colocated: engines free their memory
            train_metrics = t.run("train", train_step, args, rollout_id, actor, critic, ray.put(table))
            job.onload_rollout(args, rollout.client, t)
            if checkpoint.should_save(args, rollout_id):
                t.run("save", checkpoint.save, args, actor, rollout_id, data_source, rollout_id + 1, tracker.run_id)
            sync_metrics = {}
            if (rollout_id + 1) % args.update_weights_interval == 0:
                sync_metrics = {"sync/bytes": t.run("sync", actor.sync_weights, rollout.client,
                                                    rollout_id + 1).get("sync/bytes", 0.0)}
        except ray.exceptions.RayActorError as err:                 # a trainer rank died: last checkpoint
            if recovery.is_trainer_death(err, actor):
                job.onload_rollout(args, rollout.client)             # released engines retake (else no-op)
            actor, rollout_id = recovery.restart(err, actor, rollout_id, data_source, rollout.client)
            continue
        metrics = {**rollout_metrics, **table_metrics, **train_metrics, **t.times, **sync_metrics,
                   "perf/train_tokens_per_s": table_metrics["rollout/total_tokens"] / t.times["perf/train_time"],
                   "rollout/weight_version": float(max(s.weight_version or 0 for g in groups for s in g))}
        tracker.log_metrics(metrics, step=rollout_id)
        print(format_progress_line(rollout_id, metrics), flush=True)
        if evaluator and evaluator.due(rollout_id):
            tracker.log_metrics(job.run_async(evaluator.evaluate(rollout.group_generate)), step=rollout_id + 1)
        rollout_id += 1
    tracker.finish()
    return job.JobResult(metrics=metrics, actor=actor, rollout=rollout, run_id=tracker.run_id, placement=placement)


if __name__ == "__main__":
    from slime_ray.validation import run_cli

    sys.exit(run_cli(main))
