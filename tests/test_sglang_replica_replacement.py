"""A Serve engine replica backed by SGLangEngine whose server process dies is replaced.

The engine runs the SGLang TEST DOUBLE (tests/sglang_double.py) through the real launch path
(``launch_cmd``). With fault tolerance on (short Serve health checks + the weight store), the
test SIGKILLs only the double's process; then Serve's health check
(``EngineDeployment.check_health`` -> ``SGLangEngine.health()`` not ok) fails, Serve replaces the
replica, the new replica launches a new server process, loads the current weights from the
weight store and answers through the ingress with the current weight version.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from slime_ray.testing import make_tiny_model_dir

pytestmark = pytest.mark.ray

REPO_ROOT = str(Path(__file__).resolve().parents[1])
DOUBLE_CMD = [sys.executable, str(Path(__file__).with_name("sglang_double.py"))]
STORE = "sglang_replacement_test_weights"
REQUEST = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 6}, "return_logprob": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_actors() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA") and "engine_0" in a["name"]}


def _double_state(url: str) -> dict:
    return httpx.get(f"{url}/_test/state", timeout=10).json()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_dead_sglang_server_replica_is_replaced_with_current_weights(tmp_path):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)
    import ray
    from ray import serve
    from safetensors.torch import load_file

    from serve_apps.rollout_app import build_rollout_app
    from slime_ray.fault import start_weight_store
    from slime_ray.rollout.engine_client import EngineClient

    model_dir = str(make_tiny_model_dir(tmp_path / "model"))
    weights = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(str(f)))
    new_weights = {k: v * 1.5 for k, v in weights.items()}  # changes the double's output salt

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    port = _free_port()
    new_pid = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        store = start_weight_store(STORE)
        app = build_rollout_app(
            model_dir, num_engines=1, engine="sglang", num_cpus_per_engine=0.5,
            engine_kwargs={"launch_cmd": DOUBLE_CMD, "start_timeout_s": 60, "max_concurrency": 8},
            fault_tolerance={"health_check_period_s": 1, "health_check_timeout_s": 5, "weight_store": STORE},
        )
        serve.run(app, name="rollout", route_prefix="/")
        client = EngineClient.from_app("rollout")
        client.weight_store = store
        base = f"http://127.0.0.1:{port}"

        first = httpx.post(f"{base}/generate", json=REQUEST, timeout=60).json()
        assert first["weight_version"] == 0
        assert client.update_weights(new_weights, 1) == [1]
        before = httpx.post(f"{base}/generate", json=REQUEST, timeout=60).json()
        assert before["weight_version"] == 1 and before["output_ids"] != first["output_ids"]

        old_health = client.health()[0]
        assert old_health["ok"]
        old_state = _double_state(old_health["url"])
        old_pid, old_replicas = old_state["pid"], _replica_actors()
        assert old_replicas and _alive(old_pid)

        t0 = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)  # only the SGLang (double) server process
        while _alive(old_pid) and time.monotonic() - t0 < 10:  # dead (zombie until the engine reaps it)
            time.sleep(0.05)
        saw_unhealthy, new_health = False, None
        while time.monotonic() - t0 < 90:
            try:
                h = client.health()[0]
            except Exception:  # noqa: BLE001 - the replica is being stopped / started
                h = None
            if h is not None and not h["ok"] and h["url"] == old_health["url"]:
                saw_unhealthy = True  # the killed server's replica (a starting replacement may be slow to answer)
                assert "exited with code -9" in h["reason"], h["reason"]
            replicas = _replica_actors()
            if h is not None and h["ok"] and replicas and not replicas & old_replicas:
                new_health = h
                break
            time.sleep(0.5)
        replaced_after_s = time.monotonic() - t0
        assert new_health is not None, f"replica not replaced after {replaced_after_s:.0f} s"
        assert saw_unhealthy  # health() reported the dead server before Serve replaced the replica

        # A new server process, on a new port, holding the current weights from the store.
        assert new_health["url"] != old_health["url"] and new_health["weight_version"] == 1
        new_state = _double_state(new_health["url"])
        new_pid = new_state["pid"]
        assert new_pid != old_pid and _alive(new_pid)
        assert new_state["weight_version"] == "1" and new_state["salt"] == old_state["salt"]
        loads = [c["body"] for c in httpx.get(f"{new_health['url']}/_test/calls", timeout=10).json()
                 if c["route"] == "/update_weights_from_disk"]
        assert [b["weight_version"] for b in loads] == ["1"]

        # Served again through the ingress, with the current weights and version.
        after = httpx.post(f"{base}/generate", json=REQUEST, timeout=60)
        assert after.status_code == 200, after.text
        body = after.json()
        assert body["weight_version"] == 1 and body["meta_info"]["engine_index"] == 0
        assert body["output_ids"] == before["output_ids"]
        assert client.weight_versions() == [1]
        print(f"replica replaced {replaced_after_s:.1f} s after the server was killed "
              f"(unhealthy observed: {saw_unhealthy})")
    finally:
        serve.shutdown()
        ray.shutdown()
        if new_pid is None:  # failed early: no double server of this test may outlive it (it holds a port)
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if DOUBLE_CMD[1] in (proc.info["cmdline"] or []):
                    proc.kill()
        else:  # the replacement's server should stop with its replica
            deadline = time.monotonic() + 15
            while _alive(new_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(new_pid):
                os.kill(new_pid, signal.SIGKILL)
                pytest.fail(f"the replacement's SGLang server (pid {new_pid}) outlived serve.shutdown()")
