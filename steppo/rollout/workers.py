"""Environment workers: every environment instance lives in its own thread or process.

The generation loop never calls an environment directly. It submits ``reset``/``step`` to a
worker and collects a future, so a slow environment delays only its own episode.

* ``thread`` workers (default) suit environments that release the GIL or are quick
  (TextWorldExpress talks to a JVM; compass is pure Python).
* ``process`` workers suit environments that are not thread-safe or hold the GIL for long
  (ALFWorld's TextWorld/PDDL engine): each instance runs in its own fresh interpreter
  (`steppo.rollout.envproc`: it imports only the environment, not torch or transformers), so
  they step in parallel on several cores, a hung one is killed rather than abandoned, and
  every one exits when the trainer dies (even by ``kill -9``). Start-up (interpreter,
  imports, building the environment) does not count against ``step_timeout_s``.
* ``ray`` workers run each instance in a Ray actor (``pip install 'steppo[ray]'``): hundreds
  of environments spread over a cluster's nodes (``rollout.ray_address``: ``auto`` joins a
  running cluster, unset starts a local one), each actor reserving
  ``rollout.ray_cpus_per_env`` CPUs. Same semantics: a hung actor is killed and replaced.

A worker whose call outlives its timeout, or whose environment raised, is replaced by a fresh
one (a thread cannot be killed: it is a daemon and stays parked; a process is terminated).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from steppo.core.choices import RAY_CPUS_PER_ENV, WORKER_KINDS, ConfigError, check_choice
from steppo.envs.base import TextEnv


class _QueuedWorker:
    """A call queue served, one call at a time, by a daemon thread running `serve`
    (subclasses set up their state before calling this constructor: the thread starts here)."""

    def __init__(self, serve: Callable[[], None], name: str):
        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, method: str, *args: Any) -> Future:
        fut: Future = Future()
        self._calls.put((fut, method, args))
        return fut


class EnvWorker(_QueuedWorker):
    """One environment instance, driven by one thread, one call at a time."""

    def __init__(self, factory: Callable[[], TextEnv], name: str = "env-worker"):
        self._factory = factory
        self.env: TextEnv | None = None
        super().__init__(self._serve, name)

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                break
            fut, method, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if self.env is None:
                    self.env = self._factory()
                fut.set_result(getattr(self.env, method)(*args))
            except BaseException as exc:  # noqa: BLE001 - every failure becomes the episode's
                fut.set_exception(exc)
        if self.env is not None:
            try:
                self.env.close()
            except Exception:  # noqa: BLE001 - closing a broken environment must not raise
                pass

    def close(self) -> None:
        """Stop after the calls already queued (an abandoned, hung worker just stays parked)."""
        self._calls.put(None)


class EnvFailure(RuntimeError):
    """An exception raised inside a worker process, with its traceback text."""


class ProcessEnvWorker(_QueuedWorker):
    """One environment instance in a child interpreter (``python -m steppo.rollout.envproc``);
    same interface as `EnvWorker`. The factory must be picklable
    (`steppo.envs.registry.EnvFactory` is); its classes must be importable by module name (the
    child gets the parent's ``sys.path`` and working directory, so an import-path environment
    ``env=module:Class`` resolves there as it does in the trainer).
    """

    def __init__(self, factory: Callable[[], TextEnv], name: str = "env-process"):
        from steppo.envs.registry import refuse_in_env_process

        refuse_in_env_process("an environment process")  # never a process tree that grows without end
        self._conn, child_conn = mp.Pipe()  # a socket pair
        fd = child_conn.fileno()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "steppo.rollout.envproc", str(fd), str(os.getpid())],
                pass_fds=(fd,), stdin=subprocess.DEVNULL,
            )
        finally:
            child_conn.close()
        self.pid = self._proc.pid
        self._failed: EnvFailure | None = None
        try:
            self._conn.send(list(sys.path))  # so the child finds what the parent imports
            self._conn.send(factory)
        except (OSError, BrokenPipeError):
            pass  # the child died at once: reported by the first call
        except Exception:
            self._kill()
            raise  # a factory that does not pickle: a clear error at construction
        super().__init__(self._forward, f"{name}-io")

    def _forward(self) -> None:
        try:  # calls stay pending (not running) until the child has started
            status, payload = self._conn.recv()
            if status != "ready":
                self._failed = EnvFailure(f"environment process could not build the environment: {payload}")
        except (EOFError, OSError) as exc:
            self._failed = EnvFailure(f"environment process did not start (exit code {self._proc.poll()}): {exc!r}")
        while True:
            item = self._calls.get()
            if item is None:
                break
            fut, method, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            if self._failed is not None:
                fut.set_exception(self._failed)
                continue
            try:
                self._conn.send((method, args))
                status, payload = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError) as exc:
                fut.set_exception(EnvFailure(f"environment process died: {exc!r}"))
                break
            if status == "ok":
                fut.set_result(payload)
            else:
                fut.set_exception(EnvFailure(payload))

    def close(self) -> None:
        """Stop the child (terminated if it does not stop within a second)."""
        self._calls.put(None)
        try:
            self._conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        try:
            self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self._kill()
        self._conn.close()

    def _kill(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


_RAY_ACTOR = None


def _ray_actor_class():
    """The Ray actor class (defined on first use, so Ray stays an optional dependency)."""
    global _RAY_ACTOR
    if _RAY_ACTOR is None:
        import ray

        @ray.remote(max_restarts=0)
        class EnvActor:
            def __init__(self, factory: Callable[[], TextEnv]):
                self._factory = factory
                self.env: TextEnv | None = None

            def call(self, method: str, args: tuple) -> Any:
                if self.env is None:
                    self.env = self._factory()
                return getattr(self.env, method)(*args)

            def ready(self) -> bool:
                return True

            def close(self) -> None:
                if self.env is not None:
                    self.env.close()

        _RAY_ACTOR = EnvActor
    return _RAY_ACTOR


def _ray_started(address: str | None):
    """The `ray` module, with Ray running (``ray.init(address)`` on first use)."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("rollout.env_workers=ray needs Ray: pip install 'steppo[ray]'") from exc
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return ray


def fit_ray_cpus(requested: float | None, envs: int, cluster_cpus: float) -> float:
    """CPUs each of `envs` environment actors reserves: `requested`, or (None) 0.25 lowered so
    that every actor fits the cluster's `cluster_cpus` at once. Actors that cannot all be placed
    would wait for CPUs forever (Ray queues them), so an explicit amount that does not fit is
    refused up front with the numbers and both fixes."""
    if requested is None:
        return min(RAY_CPUS_PER_ENV, cluster_cpus / max(envs, 1)) if cluster_cpus > 0 else RAY_CPUS_PER_ENV
    if requested * envs > cluster_cpus + 1e-9:
        raise ConfigError(
            f"rollout.num_envs={envs} Ray actors x rollout.ray_cpus_per_env={requested} = {requested * envs:g} CPUs, "
            f"but the Ray cluster has {cluster_cpus:g}: the actors would wait for CPUs forever; set "
            f"rollout.ray_cpus_per_env<={cluster_cpus / max(envs, 1):.3g} (or leave it unset to fit), or lower "
            f"rollout.num_envs"
        )
    return requested


class RayEnvWorker:
    """One environment instance in a Ray actor; same interface as `EnvWorker`.

    The factory must be picklable (`steppo.envs.registry.EnvFactory` is). Ray is started on
    first use: ``ray.init(address)`` (None starts a local cluster; ``auto`` joins a running one).
    """

    def __init__(self, factory: Callable[[], TextEnv], name: str = "env-ray", address: str | None = None,
                 num_cpus: float = RAY_CPUS_PER_ENV):
        ray = _ray_started(address)
        self._ray = ray
        self._actor = _ray_actor_class().options(num_cpus=num_cpus).remote(factory)
        # wait for the actor's process, so step timeouts measure the environment, not Ray's start-up
        ray.get(self._actor.ready.remote(), timeout=300)

    def submit(self, method: str, *args: Any) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()  # the actor is up (see __init__): the call runs now
        inner = self._actor.call.remote(method, args).future()

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                fut.set_exception(EnvFailure(f"environment actor failed: {exc}"))
            else:
                fut.set_result(f.result())

        inner.add_done_callback(done)
        return fut

    def close(self) -> None:
        """Kill the actor (a hung environment is not waited for)."""
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception:  # noqa: BLE001 - an actor that already died
            pass


class WorkerPool:
    """A fixed number of environment workers handed out to episodes."""

    def __init__(self, factory: Callable[[], TextEnv], size: int, kind: str = "thread",
                 ray_address: str | None = None, ray_cpus_per_env: float | None = None):
        if size < 1:
            raise ValueError("the environment pool needs at least one worker")
        check_choice(kind, WORKER_KINDS, "rollout.env_workers")  # a ConfigError (a ValueError)
        self._factory = factory
        self._kind = kind
        if kind == "ray":
            ray = _ray_started(ray_address)
            ray_cpus_per_env = fit_ray_cpus(ray_cpus_per_env, size, float(ray.cluster_resources().get("CPU", 0.0)))
        self._ray = dict(address=ray_address, num_cpus=ray_cpus_per_env)
        self._counter = 0
        self.free: list[EnvWorker | ProcessEnvWorker] = [self._new() for _ in range(size)]
        self.replaced = 0

    def _new(self) -> EnvWorker | ProcessEnvWorker | RayEnvWorker:
        self._counter += 1
        name = f"env-{self._kind}-{self._counter}"
        if self._kind == "ray":
            return RayEnvWorker(self._factory, name, **self._ray)
        cls = EnvWorker if self._kind == "thread" else ProcessEnvWorker
        return cls(self._factory, name=name)

    def acquire(self) -> EnvWorker | ProcessEnvWorker | None:
        return self.free.pop() if self.free else None

    def release(self, worker) -> None:
        self.free.append(worker)

    def replace(self, worker) -> None:
        """Drop a hung or broken worker; a fresh one takes its place in the pool."""
        worker.close()
        self.replaced += 1
        self.free.append(self._new())

    def close(self) -> None:
        for worker in self.free:
            worker.close()
        self.free = []
