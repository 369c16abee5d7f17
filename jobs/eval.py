"""Evaluate one checkpoint on the ``--eval-prompt-data`` sets and log the metrics to MLflow.

What it does: serves the checkpoint with the rollout tier (same engines, generate function and
reward as training), samples ``--n-samples-per-eval-prompt`` responses per prompt with the eval
sampling flags, and logs ``eval/<name>/{reward_mean, pass@k, truncated_ratio, ...}`` (see
:mod:`slime_ray.rollout.eval`) to a new MLflow run. No trainer is started.

The checkpoint (``--load``, else ``--hf-checkpoint``) is an HF model folder, a ``--save``
iteration folder (``iter_XXXXXXX/`` holding ``model/``) or a ``--save`` root (its latest
iteration). A folder without tokenizer files borrows them from ``--hf-checkpoint``.
``--prompt-data`` is not needed (the first eval set stands in for it).

Launch::

    ray job submit --working-dir . -- python jobs/eval.py --hf-checkpoint smollm2-135m-instruct \\
        --load outputs/ckpt --eval-prompt-data math examples/math_grpo/train.jsonl \\
        --input-key prompt --label-key label --apply-chat-template --n-samples-per-eval-prompt 4
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slime_ray import job  # noqa: E402
from slime_ray.args import config_to_params, parse_args  # noqa: E402
from slime_ray.rollout.eval import Evaluator, parse_eval_sets  # noqa: E402
from slime_ray.rollout.manager import RolloutManager  # noqa: E402
from slime_ray.tracking import Tracker  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def resolve_checkpoint(path: str, tokenizer_dir: str) -> tuple[str, int]:
    """An HF folder to serve and the training steps it has seen (0 for a plain HF folder).

    Raises:
        FileNotFoundError: ``path`` is none of the accepted checkpoint layouts.
    """
    p, step = Path(path), 0
    if (p / "latest_checkpointed_iteration.txt").exists():
        it = int((p / "latest_checkpointed_iteration.txt").read_text().strip())
        p = p / f"iter_{it:07d}"
    if p.name.startswith("iter_") and (p / "model" / "config.json").exists():
        step, p = int(p.name[len("iter_"):]) + 1, p / "model"
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"--load {path}: not an HF folder, a --save iter_* folder or a --save root")
    if (p / "tokenizer_config.json").exists():
        return str(p), step
    merged = Path(tempfile.mkdtemp(prefix="slime_ray_eval_"))
    for src_dir, names in ((p, [f.name for f in p.iterdir()]), (Path(tokenizer_dir), TOKENIZER_FILES)):
        for name in names:
            if (src_dir / name).exists() and not (merged / name).exists():
                os.symlink((src_dir / name).resolve(), merged / name)
    return str(merged), step


def main(argv: list[str] | None = None) -> job.JobResult:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--prompt-data" not in argv and "--eval-prompt-data" in argv:
        argv += ["--prompt-data", argv[argv.index("--eval-prompt-data") + 2]]
    job.setup_logging()
    _, args = parse_args(argv)
    if not parse_eval_sets(args.eval_prompt_data):
        raise SystemExit("jobs/eval.py needs --eval-prompt-data NAME PATH [NAME PATH ...]")
    from slime_ray.models import resolve_hf_checkpoint

    args.hf_checkpoint = resolve_hf_checkpoint(args.hf_checkpoint)
    args.hf_checkpoint, step = resolve_checkpoint(args.load or args.hf_checkpoint, args.hf_checkpoint)
    evaluator = Evaluator.from_args(args)
    job.init_ray(args)
    tracker = Tracker(tracking_uri=args.mlflow_tracking_uri, experiment_name=args.mlflow_experiment_name,
                      run_name=args.run_name or "eval", params=config_to_params(args),
                      use_tensorboard=args.use_tensorboard, tensorboard_dir=args.tensorboard_dir)
    rollout = RolloutManager(args, None, job.start_rollout_app(args))
    metrics = job.run_async(evaluator.evaluate(rollout.group_generate))
    tracker.log_metrics(metrics, step=step)
    tracker.set_tags({"checkpoint": args.load or args.hf_checkpoint})
    tracker.finish()
    print(" ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), flush=True)
    return job.JobResult(metrics=metrics, actor=None, rollout=rollout, run_id=tracker.run_id)


if __name__ == "__main__":
    from slime_ray.validation import run_cli

    sys.exit(run_cli(main))
