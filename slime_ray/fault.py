"""Fault tolerance: trainer-group restarts from the last checkpoint, and the weight store that
lets a restarted engine replica load the current weights before it takes traffic.

Rollout side (``--use-fault-tolerance``): Ray Serve health-checks every engine replica
(``check_health`` every ``--rollout-health-check-interval`` s, dead after
``--rollout-health-check-timeout`` s without an answer) and replaces a dead or hung replica
itself. The replacement's constructor pulls ``(weights, weight_version)`` from the
:class:`WeightStore` actor before it returns, and Serve routes to a replica only once its
constructor has returned, so no request ever reaches stale weights. Requests that were in
flight on the dead replica are retried by the ingress / :class:`EngineClient` (on another
engine or on the replacement) for up to ``--rollout-request-retry-s`` seconds.

Training side: a trainer rank that dies surfaces as ``ray.exceptions.RayActorError`` in the
driver; :class:`TrainRecovery` kills the rest of the group, starts a new one on the same
bundles, loads the newest checkpoint of ``--save`` (model, optimizer, data cursor, RNG) and
pushes its weights to the engines, at most ``--max-train-restarts`` times. Otherwise it
stops the job with :class:`TrainerFailure`, whose message gives the resume command.
"""

from __future__ import annotations

import logging
import shlex
import sys
from argparse import Namespace
from typing import Any

import ray

from slime_ray import checkpoint

logger = logging.getLogger(__name__)

WEIGHT_STORE_NAME = "slime_ray_weight_store"
WEIGHT_STORE_NAMESPACE = "slime_ray"  # explicit: Serve replicas live in another namespace than the driver


class TrainerFailure(RuntimeError):
    """The trainer group died and cannot be restarted here; the message gives the resume command."""


def resume_command(argv: list[str] | None, save_dir: str | None) -> str:
    """The command line that resumes this job from ``save_dir`` (``--load`` set or replaced)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--load" in argv:
        i = argv.index("--load")
        del argv[i:i + 2]
    return shlex.join(["python", "jobs/grpo.py", *argv, *(["--load", save_dir] if save_dir else [])])


class TrainRecovery:
    """Restarts the trainer group from the last checkpoint when one of its ranks dies.

    Args:
        args: the job's flat namespace (``save``, ``max_train_restarts``).
        argv: the job's command line (for the resume command in error messages).
        placement: the job's placement (the new group takes the same bundles).
        make_group: ``(args, placement) -> group``; default :class:`RayTrainGroup`.
    """

    def __init__(self, args: Namespace, argv: list[str] | None, placement: Any, make_group: Any = None):
        from slime_ray.train.actor_group import RayTrainGroup

        self.args, self.argv, self.placement = args, argv, placement
        self.make_group = make_group or RayTrainGroup
        self.restarts = 0

    @staticmethod
    def is_trainer_death(err: BaseException, group: Any) -> bool:
        """Whether ``err`` is the death of one of ``group``'s actors."""
        if not isinstance(err, ray.exceptions.RayActorError):
            return False
        dead = getattr(err, "actor_id", None)
        ids = {a._actor_id.hex() for a in group.actors}
        return dead is None or dead in ids

    def restart(self, err: BaseException, group: Any, rollout_id: int, data_source: Any,
                client: Any) -> tuple[Any, int]:
        """Replace ``group`` after ``err``; returns ``(new_group, rollout id to continue from)``.

        Raises:
            err: when it is not the death of a trainer actor.
            TrainerFailure: no checkpoint in ``--save``, or ``--max-train-restarts`` used up.
        """
        if not self.is_trainer_death(err, group):
            raise err
        self.restarts += 1
        latest = checkpoint.find_latest(self.args.save) if self.args.save else None
        why = f"a trainer rank died during rollout step {rollout_id} ({type(err).__name__})"
        if latest is None:
            raise TrainerFailure(
                f"{why} and there is no checkpoint to restart from; add --save DIR --save-interval N "
                f"to restart automatically. Rerun: {resume_command(self.argv, None)}") from err
        if self.restarts > self.args.max_train_restarts:
            raise TrainerFailure(
                f"{why}; --max-train-restarts {self.args.max_train_restarts} restarts used up. "
                f"Resume with: {resume_command(self.argv, self.args.save)}") from err
        logger.warning("%s; restart %d/%d of the trainer group from %s", why, self.restarts,
                       self.args.max_train_restarts, latest)
        for a in group.actors:
            ray.kill(a, no_restart=True)
        new_group = self.make_group(self.args, self.placement)
        resume = checkpoint.ResumePoint(path=latest, meta=checkpoint.find_resume(
            Namespace(load=str(latest), save=None)).meta)
        return new_group, checkpoint.restore(resume, new_group, data_source, client)


# ----------------------------------------------------------------------------- weight store
@ray.remote(num_cpus=0)
class WeightStore:
    """The newest weights sent to the engines and their version (one copy, owned by this actor).

    :meth:`publish` is called before every weight push; a restarted engine replica calls
    :meth:`latest` in its constructor.
    """

    def __init__(self) -> None:
        self.version = 0
        self.ref: ray.ObjectRef | None = None

    async def publish(self, wrapped: list, weight_version: int) -> int:
        weights = await wrapped[0] if isinstance(wrapped[0], ray.ObjectRef) else wrapped[0]
        self.ref = ray.put(weights)  # owned here: survives the trainer that produced it
        self.version = int(weight_version)
        return self.version

    def latest(self) -> tuple[int, list]:
        """``(weight_version, [ref])`` (``[]`` before the first publish)."""
        return self.version, ([self.ref] if self.ref is not None else [])


def start_weight_store(name: str = WEIGHT_STORE_NAME) -> Any:
    """The job's weight store actor (created, or the running one of that name)."""
    return WeightStore.options(name=name, namespace=WEIGHT_STORE_NAMESPACE, get_if_exists=True).remote()


def pull_current_weights(engine: Any, store_name: str) -> int:
    """Load the store's newest weights into ``engine`` (a RolloutEngine); returns its weight version.

    Called by an engine replica's constructor, so the replica serves no request before it has them.
    """
    try:
        store = ray.get_actor(store_name, namespace=WEIGHT_STORE_NAMESPACE)
    except ValueError:
        logger.warning("no weight store %r: engine keeps weight version %d", store_name, engine.weight_version)
        return engine.weight_version  # no store yet: the job has not synced weights
    version, wrapped = ray.get(store.latest.remote())
    if wrapped and version != engine.weight_version:
        from slime_ray.sync.transport import as_tensors

        engine.update_weights(as_tensors(ray.get(wrapped[0])), version)
        logger.warning("engine replica loaded weight version %d from the weight store", version)
    return engine.weight_version
