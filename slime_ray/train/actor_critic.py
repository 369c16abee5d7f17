"""Training models of a job and one training step: the actor group, plus a critic group for PPO.

slime's ``create_training_models`` / the train phase of ``train.py``: the critic exists only
with ``--advantage-estimator ppo`` and shares the actor's bundles (each group takes half of
every bundle). Per rollout step, in slime's order:

1. critic: values of every response token (before its update),
2. actor: old / reference log-probs, GAE advantages and returns from those values,
3. critic trains on the returns while the actor trains on the advantages (concurrently, as
   slime's ``async_train``); for the first ``--num-critic-only-steps`` steps only the critic trains.
"""

from __future__ import annotations

from argparse import Namespace

import ray

from slime_ray.placement import Placement
from slime_ray.train.actor_group import RayTrainGroup


def create_training_models(args: Namespace, placement: Placement) -> tuple[RayTrainGroup, RayTrainGroup | None]:
    """The actor group and, for ``--advantage-estimator ppo``, the critic group on the same bundles.

    Returns:
        ``(actor, critic)``; critic is None unless the estimator is ppo.
    """
    if args.advantage_estimator != "ppo":
        return RayTrainGroup(args, placement), None
    actor = RayTrainGroup(args, placement, role="actor", resource_fraction=0.5)
    critic = RayTrainGroup(args, placement, role="critic", resource_fraction=0.5)
    return actor, critic


def train_step(args: Namespace, rollout_id: int, actor: RayTrainGroup, critic: RayTrainGroup | None,
               table_ref: ray.ObjectRef) -> dict[str, float]:
    """Train on one rollout: actor only, or critic values -> actor GAE -> critic + actor updates.

    Args:
        args: flags (``num_critic_only_steps``).
        rollout_id: the rollout step.
        actor, critic: from :func:`create_training_models`.
        table_ref: object-store ref to the rollout's Arrow table.

    Returns:
        rank 0's ``train/*`` metrics (absent during critic-only steps) and ``critic/*`` metrics.
    """
    if critic is None:
        return actor.train(rollout_id, table_ref)
    values = critic.compute_values(table_ref)                       # [B, L]
    returns = actor.compute_advantages(rollout_id, table_ref, values)  # [B, L], GAE
    critic_refs = critic.async_train(rollout_id, table_ref, values, returns)
    metrics: dict[str, float] = {}
    if rollout_id >= getattr(args, "num_critic_only_steps", 0):
        metrics.update(actor.train(rollout_id, table_ref))
    metrics.update(ray.get(critic_refs)[0])
    return metrics
