"""Environment workers: each environment instance lives in its own daemon thread.

The generation loop never calls an environment directly. It submits ``reset``/``step`` to a
worker and collects a future, so a slow environment delays only its own episode. A worker whose
call outlives its timeout is abandoned (its thread cannot be killed, but it is a daemon and
never blocks exit) and replaced by a fresh one; an environment that raised is replaced too.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from steppo.envs.base import TextEnv


class EnvWorker:
    """One environment instance, driven by one thread, one call at a time."""

    def __init__(self, factory: Callable[[], TextEnv], name: str = "env-worker"):
        self._factory = factory
        self._calls: queue.Queue = queue.Queue()
        self.env: TextEnv | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, method: str, *args: Any) -> Future:
        fut: Future = Future()
        self._calls.put((fut, method, args))
        return fut

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


class WorkerPool:
    """A fixed number of environment workers handed out to episodes."""

    def __init__(self, factory: Callable[[], TextEnv], size: int):
        if size < 1:
            raise ValueError("the environment pool needs at least one worker")
        self._factory = factory
        self._counter = 0
        self.free: list[EnvWorker] = [self._new() for _ in range(size)]
        self.replaced = 0

    def _new(self) -> EnvWorker:
        self._counter += 1
        return EnvWorker(self._factory, name=f"env-worker-{self._counter}")

    def acquire(self) -> EnvWorker | None:
        return self.free.pop() if self.free else None

    def release(self, worker: EnvWorker) -> None:
        self.free.append(worker)

    def replace(self, worker: EnvWorker) -> None:
        """Abandon a hung or broken worker; a fresh one takes its place in the pool."""
        worker.close()
        self.replaced += 1
        self.free.append(self._new())

    def close(self) -> None:
        for worker in self.free:
            worker.close()
        self.free = []
