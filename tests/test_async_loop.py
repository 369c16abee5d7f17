"""Unit tests of the async loop's parts (no Ray): staleness filter, flag checks, producer, bundles."""

import threading
import time
from argparse import Namespace

import pytest

from slime_ray.args import ConfigError
from slime_ray.placement import plan_bundles
from slime_ray.rollout.async_loop import BusyLog, RolloutProducer, check_async_args, filter_stale, sample_version
from slime_ray.types import Sample


def _sample(versions, gid=0):
    s = Sample(group_index=gid, tokens=[1, 2])
    for v in versions:
        s.append_response_tokens([5], [-0.1], trainable=True, weight_version=v)
    return s


def test_token_versions_of_a_partial_rollout():
    s = _sample([1, 1, 2])
    s.append_response_tokens([7], None, trainable=False)  # tool token
    assert s.token_weight_versions == [1, 1, 2, -1]
    assert s.weight_versions == [1, 2]
    assert sample_version(s) == 1  # judged by its oldest engine token


def test_filter_stale_drops_whole_groups_and_counts():
    groups = [[_sample([3]), _sample([3])], [_sample([2]), _sample([3])], [_sample([1, 2]), _sample([3])]]
    kept, m = filter_stale(groups, trainer_version=3, max_staleness=1)
    assert kept == groups[:2]
    assert m["rollout/staleness_0"] == 4 and m["rollout/staleness_1"] == 1 and m["rollout/staleness_2"] == 1
    assert m["rollout/stale_dropped_groups"] == 1 and m["rollout/stale_dropped_samples"] == 2
    assert m["rollout/staleness_max"] == 1 and m["rollout/staleness_mean"] == pytest.approx(0.25)
    kept_all, m_all = filter_stale(groups, trainer_version=3, max_staleness=None)
    assert kept_all == groups and m_all["rollout/stale_dropped_samples"] == 0


def _args(**kw):
    base = dict(colocate=False, async_buffer_size=1, max_staleness=None, update_weights_interval=1,
                advantage_estimator="grpo")
    return Namespace(**{**base, **kw})


def test_check_async_args_refusals():
    with pytest.raises(ConfigError, match="--colocate"):
        check_async_args(_args(colocate=True))
    with pytest.raises(ConfigError, match="raise --max-staleness to >= 2"):
        check_async_args(_args(max_staleness=1, update_weights_interval=3))
    with pytest.raises(ConfigError, match="async-buffer-size"):
        check_async_args(_args(async_buffer_size=0))
    check_async_args(_args(max_staleness=1, update_weights_interval=2))


class _FakeManager:
    def __init__(self):
        self.started = []

    async def generate_rollout(self, rid):
        self.started.append((rid, time.perf_counter()))
        return [[_sample([0])]], {"rollout/x": float(rid)}


def test_producer_waits_for_weights_and_bounds_the_buffer():
    m = _FakeManager()
    p = RolloutProducer(m, _args(max_staleness=0, async_buffer_size=1), num_rollout=3).start()
    time.sleep(0.3)
    assert [r for r, _ in m.started] == [0]  # rollout 1 needs version >= 1
    rid, groups, metrics = p.get()
    assert rid == 0 and metrics["rollout/x"] == 0.0 and "perf/rollout_wait_buffer_time" in metrics
    p.set_engine_version(1)
    rid, _, metrics = p.get()
    assert rid == 1 and metrics["perf/rollout_wait_weights_time"] > 0.2
    p.stop()

    m2 = _FakeManager()
    p2 = RolloutProducer(m2, _args(async_buffer_size=1), num_rollout=5).start()
    time.sleep(0.3)
    assert len(m2.started) == 2  # one queued + one generated and waiting to be queued
    p2.stop()


def test_producer_error_reaches_the_trainer():
    class Bad:
        async def generate_rollout(self, rid):
            raise RuntimeError("engine down")

    p = RolloutProducer(Bad(), _args(), num_rollout=2).start()
    with pytest.raises(RuntimeError, match="engine down"):
        p.get()


def test_busy_log_overlap():
    b = BusyLog()
    b.start()
    time.sleep(0.05)
    b.stop()
    t = time.perf_counter()
    assert b.overlap(t - 10, t) == pytest.approx(0.05, abs=0.03)
    assert b.overlap(t, t + 1) == 0.0
    assert threading.active_count() >= 1


def test_plan_bundles_colocated_and_disaggregated():
    bundles, lay = plan_bundles(2, 1, colocate=True, use_gpu=True, cpus_per_actor=1, cpus_per_engine=1)
    assert len(bundles) == 2 and lay["rollout_bundle_offset"] == 0
    assert lay["actor_options"]["num_gpus"] + lay["engine_options"]["num_gpus"] <= 1
    bundles, lay = plan_bundles(2, 2, colocate=False, use_gpu=False, cpus_per_actor=1, cpus_per_engine=2)
    assert bundles == [{"CPU": 1.0}] * 2 + [{"CPU": 2.0}] * 2 and lay["rollout_bundle_offset"] == 2
