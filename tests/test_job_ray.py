"""The local Ray cluster a job starts (slime_ray.job.init_ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import os
from argparse import Namespace
import ray
from slime_ray import job

def worker_nice():
    @ray.remote(num_cpus=0)
    def nice():
        return os.nice(0)
    return ray.get(nice.remote())

ray.init(address="local", num_cpus=1, include_dashboard=False)  # Ray's own default
print("DEFAULT", worker_nice() - os.nice(0))
ray.shutdown()
job.init_ray(Namespace(ray_address=None))  # the job's local cluster
print("JOB", worker_nice() - os.nice(0))
ray.shutdown()
"""


def test_actors_of_a_cluster_the_job_starts_are_not_niced():
    """Ray runs workers 15 nice levels below the driver; the job's own cluster runs them at the
    driver's level (the engine's decode was ~1.5x slower at 15 on a 2-vCPU machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                         env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("DEFAULT", "JOB")))
    # Ray adds 15 to the driver's level (capped at 19): any positive offset shows the default
    assert int(lines["DEFAULT"]) > 0 and lines["JOB"] == "0", out.stdout
