"""Process environment workers at scale (issue 13, item 8): each is a fresh interpreter that
imports only its environment (no torch/transformers), starts quickly, and exits when the
trainer dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from steppo.config import EnvConfig
from steppo.envs.registry import env_factory
from steppo.rollout.workers import WorkerPool

# Measured for compass on CPython 3.11: ~32 MB per worker (the interpreter ~11 MB, compass's
# 2000-task lists ~15 MB); the multiprocessing-spawn workers before this took ~264 MB each.
MAX_RSS_MB = 60


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except FileNotFoundError:
        return {}


def _alive(pid: int) -> bool:
    state = _status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))  # a zombie has exited


def test_process_workers_import_only_the_environment_and_stay_small():
    t0 = time.perf_counter()
    pool = WorkerPool(env_factory(EnvConfig(name="compass")), 4, "process")
    try:
        assert all(len(f.result(timeout=60)) > 0 for f in [w.submit("tasks", "train") for w in pool.free])
        started = time.perf_counter() - t0
        for w in pool.free:
            rss_mb = int(_status(w.pid)["VmRSS"].split()[0]) / 1024
            assert rss_mb <= MAX_RSS_MB, f"worker {w.pid}: {rss_mb:.1f} MB"
            maps = open(f"/proc/{w.pid}/maps").read()
            assert "libtorch" not in maps and "transformers" not in maps
        assert started < 30, started
    finally:
        pool.close()


PARENT = textwrap.dedent("""
    import sys, time
    from steppo.config import EnvConfig
    from steppo.envs.registry import env_factory
    from steppo.rollout.workers import WorkerPool
    pool = WorkerPool(env_factory(EnvConfig(name="compass")), 2, "process")
    [w.submit("tasks", "train").result(timeout=60) for w in pool.free]
    print(" ".join(str(w.pid) for w in pool.free), flush=True)
    time.sleep(120)
""")


def test_workers_exit_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "orphaned environment workers"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_ray_actors_that_cannot_all_be_placed_are_fitted_or_refused_up_front():
    """The README's Ray command asked for 16 actors x 0.25 CPU on a 2-CPU machine and waited for
    CPUs forever: unset, the share is fitted to the cluster; an explicit share that cannot fit
    is a clear error naming both keys."""
    from steppo.config import ConfigError
    from steppo.rollout.workers import fit_ray_cpus

    assert fit_ray_cpus(None, 16, 2.0) == 0.125   # 16 actors fit 2 CPUs
    assert fit_ray_cpus(None, 4, 8.0) == 0.25     # the usual share when it fits
    assert fit_ray_cpus(0.5, 4, 2.0) == 0.5       # explicit and fits: kept
    with pytest.raises(ConfigError, match=r"rollout.num_envs=16.*rollout.ray_cpus_per_env=0.25.*4 CPUs.*has 2"):
        fit_ray_cpus(0.25, 16, 2.0)
