"""Learning, shown: reward curve and held-out accuracy before vs after GRPO, from MLflow runs.

Reads each run's ``rollout/reward_mean`` (per step) and ``eval/<set>/pass_at_1`` (held-out accuracy:
the mean over every eval sample of math-verify's 0/1 verdict, logged at step 0 before training and
at each ``--eval-interval``), draws one PNG (reward per step with a 5-step moving average; held-out
accuracy per eval step), logs it as an artifact of every run, and prints the before/after table with
the seed-to-seed spread (max - min over runs) of both columns.

Runs are made with ``jobs/grpo.py`` (the command is in bench/RESULTS.md, "Learning, shown")::

    python bench/learning_curve.py --tracking-uri sqlite:////tmp/learn/mlflow.db \\
        --runs learn2_seed1 learn2_seed2 --out docs/learning_curve.png

Raises SystemExit with a message naming the run or metric when one is missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one metric, by step (last value per step)."""
    by_step = {m.step: m.value for m in client.get_metric_history(run_id, key)}
    return sorted(by_step.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="run names (one per seed)")
    p.add_argument("--eval-set", default="test")
    p.add_argument("--out", default="docs/learning_curve.png")
    p.add_argument("--no-artifact", action="store_true", help="do not log the PNG to the runs")
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.set_tracking_uri(a.tracking_uri)
    client = mlflow.MlflowClient()
    acc_key = f"eval/{a.eval_set}/pass_at_1"
    runs = {}
    for name in a.runs:
        found = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.runName = '{name}'",
                                   output_format="list")
        if not found:
            sys.exit(f"learning_curve: no run named {name!r} in {a.tracking_uri}")
        run = found[0]
        rid = run.info.run_id
        reward, acc = history(client, rid, "rollout/reward_mean"), history(client, rid, acc_key)
        if not reward or len(acc) < 2:
            sys.exit(f"learning_curve: run {name!r} needs rollout/reward_mean and {acc_key} at >= 2 eval steps "
                     f"(has {len(reward)} reward steps, {len(acc)} eval steps)")
        runs[name] = (rid, reward, acc)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (_, reward, acc) in runs.items():
        steps, vals = zip(*reward)
        line, = ax1.plot(steps, vals, alpha=0.35)
        ma = [statistics.mean(vals[max(0, i - 4): i + 1]) for i in range(len(vals))]
        ax1.plot(steps, ma, color=line.get_color(), label=f"{name} (5-step mean)")
        ax2.plot(*zip(*acc), marker="o", color=line.get_color(), label=name)
    ax1.set(xlabel="rollout step", ylabel="train reward (accuracy of the step's samples)", title="GRPO reward")
    ax2.set(xlabel="rollout step", ylabel=f"held-out accuracy ({a.eval_set})", title="held-out accuracy")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")

    before = [acc[0][1] for _, _, acc in runs.values()]
    after = [acc[-1][1] for _, _, acc in runs.values()]
    print(f"| run | held-out accuracy before (step {list(runs.values())[0][2][0][0]}) | after | change |")
    print("|---|---|---|---|")
    for name, (_, _, acc) in runs.items():
        print(f"| {name} | {acc[0][1]:.3f} | {acc[-1][1]:.3f} (step {acc[-1][0]}) | {acc[-1][1] - acc[0][1]:+.3f} |")
    gain = statistics.mean(after) - statistics.mean(before)
    spread = max(max(before) - min(before), max(after) - min(after))
    print(f"mean before {statistics.mean(before):.3f}, mean after {statistics.mean(after):.3f}, gain {gain:+.3f}; "
          f"seed-to-seed spread (max - min of either column) {spread:.3f}; gain > spread: {gain > spread}")
    if not a.no_artifact:
        for rid, _, _ in runs.values():
            client.log_artifact(rid, a.out)
        print(f"logged {a.out} as an artifact of {len(runs)} run(s)")


if __name__ == "__main__":
    main()
