"""EngineRouter without Ray: least-loaded picks, session affinity, health, backpressure."""

from __future__ import annotations

import asyncio

import pytest

from slime_ray.rollout.router import EngineRouter


def test_least_loaded_and_round_robin_on_ties():
    r = EngineRouter(3)
    assert sorted(r.pick() for _ in range(3)) == [0, 1, 2]  # ties rotate
    r.outstanding[:] = [5, 1, 3]
    assert all(r.pick() == 1 for _ in range(5))


def test_session_affinity_and_failover():
    r = EngineRouter(2, unhealthy_cooldown_s=60)
    r.outstanding[:] = [0, 9]
    first = r.pick("s")
    r.outstanding[:] = [9, 0]
    assert first == 0 and r.pick("s") == 0  # pinned although engine 0 is busier now
    r.mark_failed(0)
    assert r.pick("s") == 1 and r.pick("s") == 1  # moved once, then pinned to the new engine
    assert r.pick() == 1  # unhealthy engine skipped
    r.mark_healthy(0)
    assert r.pick("s") == 1


def test_session_table_is_bounded():
    r = EngineRouter(2, max_sessions=3)
    for k in range(10):
        r.pick(f"s{k}")
    assert list(r.sessions) == ["s7", "s8", "s9"]


def test_slots_apply_backpressure():
    r = EngineRouter(1, max_concurrency=2)
    running, peak = 0, 0

    async def one():
        nonlocal running, peak
        async with r.slot(0):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    async def main():
        await asyncio.gather(*[one() for _ in range(7)])

    asyncio.run(main())
    assert peak == 2 and r.outstanding == [0]


def test_bad_sizes_refused():
    with pytest.raises(ValueError, match="max_concurrency"):
        EngineRouter(1, max_concurrency=0)


def test_start_rollout_app_refuses_missing_sglang_before_serve(monkeypatch):
    from slime_ray import job
    from slime_ray.args import ConfigError, parse_args
    from slime_ray.engines import sglang

    monkeypatch.setattr(sglang, "sglang_available", lambda: False)
    _, args = parse_args(["--prompt-data", "p.jsonl", "--hf-checkpoint", "m", "--rollout-engine", "sglang"])
    assert args.rollout_max_concurrency == 512
    with pytest.raises(ConfigError, match="slime_ray\\[sglang\\]"):
        job.start_rollout_app(args)  # refused before Ray or Serve is touched


def test_serve_config_yaml_is_valid_and_builds():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_apps.rollout_app import app_builder

    path = Path(__file__).resolve().parents[1] / "serve_apps" / "rollout_config.yaml"
    config = ServeDeploySchema.parse_obj(yaml.safe_load(path.read_text()))
    (rollout,) = [a for a in config.applications if a.name == "rollout"]
    assert rollout.import_path == "serve_apps.rollout_app:app"
    assert app_builder(rollout.args) is not None  # every key is one the builder knows


def test_gap_batcher_keeps_a_spread_burst_in_one_batch():
    from slime_ray.rollout.batcher import GapBatcher

    calls = []

    async def fn(items):
        calls.append(list(items))
        await asyncio.sleep(0.01)
        if "bad" in items:
            raise ValueError("bad item")
        return [x * 2 for x in items]

    async def main():
        b = GapBatcher(fn, max_batch_size=8, gap_s=0.05, max_wait_s=1.0)

        async def late(x, delay):
            await asyncio.sleep(delay)
            return await b.submit(x)

        # 6 items spread over 0.12 s (longer than gap_s from the first): still one batch
        first = await asyncio.gather(*[late(i, 0.02 * i) for i in range(6)])
        over = await asyncio.gather(*[b.submit(i) for i in range(10)])  # 8 + 2
        with pytest.raises(ValueError, match="bad item"):
            await b.submit("bad")
        return first, over

    first, over = asyncio.run(main())
    assert first == [0, 2, 4, 6, 8, 10] and over == [2 * i for i in range(10)]
    assert [len(c) for c in calls] == [6, 8, 2, 1]


def test_gap_batcher_closes_a_complete_burst_without_the_gap():
    """A burst whose members all arrived runs at once; a burst with a member missing waits the gap."""
    import time

    from slime_ray.rollout.batcher import GapBatcher

    calls = []

    async def fn(items):
        calls.append((time.monotonic(), list(items)))
        return [x * 2 for x in items]

    async def main():
        b = GapBatcher(fn, max_batch_size=8, gap_s=0.5, max_wait_s=5.0)
        t0 = time.monotonic()
        out = await asyncio.gather(*[b.submit(i, burst=("a", 4)) for i in range(4)])
        fast = time.monotonic() - t0
        t0 = time.monotonic()  # 3 of 4 members: no early close, the gap rule applies
        out2 = await asyncio.gather(*[b.submit(i, burst=("b", 4)) for i in range(3)])
        slow = time.monotonic() - t0
        t0 = time.monotonic()  # a complete burst plus an untagged request: gap rule
        out3 = await asyncio.gather(b.submit(9), *[b.submit(i, burst=("c", 2)) for i in range(2)])
        mixed = time.monotonic() - t0
        return out, fast, out2, slow, out3, mixed

    async def larger_than_a_batch():  # 12 members, batches of 8: the second batch closes at once too
        b = GapBatcher(fn, max_batch_size=8, gap_s=0.5, max_wait_s=5.0)
        t0 = time.monotonic()
        out = await asyncio.gather(*[b.submit(i, burst=("d", 12)) for i in range(12)])
        return out, time.monotonic() - t0

    out, fast, out2, slow, out3, mixed = asyncio.run(main())
    assert out == [0, 2, 4, 6] and out2 == [0, 2, 4] and out3 == [18, 0, 2]
    assert [len(c) for _, c in calls] == [4, 3, 3]
    assert fast < 0.25 and slow >= 0.45 and mixed >= 0.45, (fast, slow, mixed)
    calls.clear()
    out4, big = asyncio.run(larger_than_a_batch())
    assert out4 == [2 * i for i in range(12)] and [len(c) for _, c in calls] == [8, 4] and big < 0.25, big


def test_slots_if_free_takes_all_or_none():
    r = EngineRouter(1, max_concurrency=4)

    async def main():
        async with r.slot(0):  # 1 of 4 taken
            async with r.slots_if_free(0, 4) as held:
                assert held is False and r.outstanding == [1]
            async with r.slots_if_free(0, 3) as held:
                assert held is True and r.outstanding == [4]
                async with r.slots_if_free(0, 1) as more:
                    assert more is False
        assert r.outstanding == [0]
        async with r.slots_if_free(0, 4) as held:
            assert held is True

    asyncio.run(main())


def test_merging_runner_merges_lists_that_wait_and_splits_long_ones():
    """Lists submitted while a call runs go into the next call, oldest first, up to
    max_batch_size; a list longer than that is split; each caller gets its own results."""
    import threading
    import time

    from slime_ray.rollout.batcher import MergingRunner

    calls: list[list[int]] = []
    release = threading.Event()

    def fn(batch):
        calls.append(list(batch))
        if len(calls) == 1:
            release.wait(5)  # hold the first call until the others have queued
        return [x * 10 for x in batch]

    runner = MergingRunner(fn)
    results: dict[str, list[int]] = {}

    def call(name, items, size=6):
        results[name] = runner.run(items, size)

    first = threading.Thread(target=call, args=("a", [1, 2]))
    first.start()
    while not calls:
        time.sleep(0.001)
    waiting = [threading.Thread(target=call, args=(n, items)) for n, items in
               (("b", [3, 4, 5]), ("c", [6, 7]), ("d", [8, 9]))]
    for t in waiting:
        t.start()
        time.sleep(0.05)  # b, c, d queue in this order
    release.set()
    for t in [first, *waiting]:
        t.join(5)
    # b (3) + c (2) fit in 6; d (2) would make 7, so it runs next
    assert calls == [[1, 2], [3, 4, 5, 6, 7], [8, 9]]
    assert results == {"a": [10, 20], "b": [30, 40, 50], "c": [60, 70], "d": [80, 90]}

    calls.clear()
    assert runner.run(list(range(5)), 2) == [0, 10, 20, 30, 40]
    assert calls == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="max_batch_size"):
        runner.run([1], 0)


def test_merging_runner_hands_an_error_to_every_caller_of_that_call():
    from slime_ray.rollout.batcher import MergingRunner

    def fn(batch):
        if 13 in batch:
            raise KeyError("bad request 13")
        return batch

    runner = MergingRunner(fn)
    with pytest.raises(KeyError, match="bad request 13"):
        runner.run([12, 13])
    assert runner.run([14]) == [14]  # the runner keeps working after a failed call


def test_merging_runner_caller_whose_items_ran_returns_without_running_later_work():
    """A runs; B and C queue; B's call takes both; D queues during it. C then returns at
    once: D's list runs in D's own thread, never in C's."""
    import threading
    import time

    from slime_ray.rollout.batcher import MergingRunner

    calls: list[tuple[list[int], str]] = []
    gates = [threading.Event(), threading.Event()]

    def fn(batch):
        calls.append((list(batch), threading.current_thread().name))
        if len(calls) <= 2:
            gates[len(calls) - 1].wait(5)
        return batch

    runner = MergingRunner(fn)
    threads = {n: threading.Thread(target=runner.run, args=(items, 8), name=n)
               for n, items in (("A", [1]), ("B", [2]), ("C", [3]), ("D", [4]))}
    threads["A"].start()
    while not calls:
        time.sleep(0.001)
    threads["B"].start()
    time.sleep(0.05)
    threads["C"].start()
    time.sleep(0.05)
    gates[0].set()  # A's call ends; B or C takes the turn and runs [2, 3]
    while len(calls) < 2:
        time.sleep(0.001)
    threads["D"].start()
    time.sleep(0.05)
    gates[1].set()
    for t in threads.values():
        t.join(5)
    assert [c[0] for c in calls] == [[1], [2, 3], [4]]
    assert calls[2][1] == "D"
