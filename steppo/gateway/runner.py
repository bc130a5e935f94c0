"""Playing an external agent's episodes through the gateway (``env=agent``).

`AgentRunner` has the rollout engine's interface (`run` -> `RolloutResult`), so the trainer,
evaluation and the update see an external agent exactly as a built-in environment: it serves
the policy on a loopback gateway, runs ``concurrency`` agents at once (one session per episode,
``run(task, base_url)`` in a thread; an ``async def`` agent gets its own event loop) while the
calling thread generates for them (the gateway's batches wait for every agent now playing), gives each
its return value as the reward, ends the session, and reads the finished trajectories back from
the data pool, so training sees exactly what the pool holds. Evaluation episodes are decoded
greedily whatever the agent asks. An agent that raises ends its episode as ``agent_error``: the
error is counted and the episode is never trained on.

Resume: a checkpoint records how far the pool had been read (`offset`). A restarted trainer
(`resume`) replays the iteration after its checkpoint with the same tasks; each episode of the
interrupted attempt of that iteration that finished in the pool, sampled from exactly the
checkpoint's weights (every step at its policy version, not an evaluation), is taken from the
pool instead of being played again (``gateway/resumed_trajectories``), so it is trained on once
and lost to no one; what the interrupted attempt finished later, on weights the checkpoint does
not hold, is left in the pool and never trained on (``gateway/resume_discarded``).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from steppo.envs.base import Task
from steppo.gateway.pool import read_pool
from steppo.gateway.server import BackgroundServer, create_app
from steppo.gateway.service import Limits, gateway_for
from steppo.gateway.sessions import SessionError
from steppo.rollout.engine import Episode, RolloutError, RolloutResult


class AgentRunner:
    """The engine of ``env=agent`` (see module doc).

    Args:
        fn: the agent, ``run(task_payload: dict, base_url: str) -> float | dict``.
        models: the policy (`steppo.models.build.Models`); `backend` generates with it.
        pool_dir: the run's data pool.
        concurrency: agents at once.
        max_new_tokens / context_limit: the per-call limits (``rollout.*``).
    """

    def __init__(self, fn, models, backend, pool_dir: str | Path, concurrency: int, temperature: float,
                 max_new_tokens: int, context_limit: int, session_timeout_s: float = 600.0):
        self.fn = fn
        self.backend = backend
        self.concurrency = concurrency
        self.version = 0
        self.greedy_sessions: set[str] = set()
        self.playing = 0  # agents in an episode now: the calls a batch can expect
        self.gateway = gateway_for(models, pool_dir, temperature=temperature, backend=backend,
                                   limits=Limits(max_tokens=max_new_tokens, context_limit=context_limit),
                                   session_timeout_s=session_timeout_s, policy_version=lambda: self.version,
                                   threaded=False, expected=lambda: max(1, self.playing))
        self.gateway.force_greedy = self.greedy_sessions.__contains__
        self.pool_dir = Path(pool_dir)
        self.offset = read_pool(self.pool_dir).offset  # what an earlier attempt wrote is not replayed
        self.carried: dict[str, Any] = {}  # resumed: episode key -> its finished trajectory in the pool
        self.resumed = self.discarded = 0
        self.server = BackgroundServer(create_app(self.gateway, max_concurrent=max(64, 4 * concurrency)))
        self.url = self.server.__enter__()
        self.errors = 0

    def run(self, tasks: list[Task], group_ids: list[str], seed: int, iteration: Any = 0, greedy: bool = False,
            policy_version: int = 0, indices: list[int] | None = None) -> RolloutResult:
        t0 = time.perf_counter()
        self.version = policy_version
        indices = list(range(len(tasks))) if indices is None else indices
        tag = secrets.token_hex(3)
        keys = [_episode_key(iteration, i, g) for i, g in zip(indices, group_ids, strict=True)]
        sessions = [f"{key}-{tag}" for key in keys]
        carried = {} if greedy else {k: self.carried.pop(key) for k, key in enumerate(keys) if key in self.carried}
        if not greedy:
            self.discarded += len(self.carried)  # only the first round after a resume can take them
            self.carried.clear()
        self.resumed += len(carried)
        if greedy:
            self.greedy_sessions.update(sessions)
        outcomes: dict[str, tuple[str, bool | None, str | None]] = {}
        lock = threading.Lock()

        def play(k: int) -> None:
            sid, task = sessions[k], tasks[k]
            with lock:
                self.playing += 1
            try:
                out = self.fn(dict(task.payload), f"{self.url}/sessions/{sid}/v1")
                if inspect.isawaitable(out):
                    out = asyncio.run(out)
                reward, success, status = _outcome(out)
                try:
                    self.gateway.store.reward(sid, reward)
                    self.gateway.store.end(sid, status, success)
                except SessionError:  # no call made, or the agent ended the session itself
                    pass
                with lock:
                    outcomes[sid] = (status, success, None)
            except Exception as exc:  # noqa: BLE001 - the episode's failure, not the run's
                with lock:
                    outcomes[sid] = ("agent_error", None, f"{type(exc).__name__}: {exc}")
                    self.errors += 1
                try:
                    self.gateway.store.end(sid, "truncated", reason="agent_error")
                except SessionError:
                    pass
            finally:
                with lock:
                    self.playing -= 1
                self.gateway.batcher.release(f"{sid}#")

        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="agent") as ex:
            futures = [ex.submit(play, k) for k in range(len(tasks)) if k not in carried]
            # generation runs here, on the caller's thread, while the agents play on theirs
            try:
                self.gateway.batcher.serve(until=lambda: all(f.done() for f in futures))
            except BaseException:  # interrupted: the agents' pending calls fail rather than wait forever
                self.gateway.batcher.close()
                raise
        self.greedy_sessions.difference_update(sessions)
        read = read_pool(self.pool_dir, self.offset)
        self.offset = read.offset
        by_session = {t.group_id: t for t in read.trajectories}
        for k, traj in carried.items():
            by_session[sessions[k]] = traj
            outcomes[sessions[k]] = (traj.end_reason, traj.success, None)
        trajectories, episodes = [], []
        for k, (sid, task) in enumerate(zip(sessions, tasks, strict=True)):
            status, success, error = outcomes.get(sid, ("agent_error", None, "no outcome"))
            traj = by_session.get(sid)
            ep = Episode(index=indices[k], key=sid, task=task, group_id=group_ids[k], generator=None,
                         end_reason="env_error" if status == "agent_error" else status, error=error)
            if traj is not None:
                traj.group_id, traj.task_id, traj.success = group_ids[k], task.id, success
                ep.steps, ep.success = traj.steps, bool(success)
                if status != "agent_error":
                    trajectories.append(traj)
            episodes.append(ep)
        failed = [e for e in episodes if e.end_reason == "env_error"]
        if episodes and len(failed) == len(episodes):
            raise RolloutError(f"every agent episode of this round failed; first error: {failed[0].error}")
        gen_tokens = sum(len(s.response_ids) for t in trajectories for s in t.steps)
        return RolloutResult(trajectories=trajectories, episodes=episodes, generated_tokens=gen_tokens,
                             generation_s=time.perf_counter() - t0, wall_s=time.perf_counter() - t0, env_calls=[],
                             generation_calls=[],
                             extra={**self.gateway.metrics(), "gateway/agent_errors": float(self.errors),
                                    "gateway/resumed_trajectories": float(self.resumed),
                                    "gateway/resume_discarded": float(self.discarded)})

    def resume(self, offset: int, version: int) -> None:
        """Continue from a checkpoint that had read the pool up to `offset` at policy `version`
        (see the module doc): finished training episodes after `offset` sampled at `version` are
        kept for the next round; the pool is read on from its end."""
        read = read_pool(self.pool_dir, offset)
        for t in read.trajectories:
            key = t.group_id.rsplit("-", 1)[0]
            fresh = all(s.policy_version == version and not s.info.get("greedy") for s in t.steps)
            if fresh and t.end_reason not in ("agent_error", "timeout") and key.startswith("it"):
                self.carried[key] = t
            else:
                self.discarded += 1
        self.offset = read.offset

    def close(self) -> None:
        self.server.__exit__(None, None, None)
        self.gateway.batcher.close()


def _episode_key(iteration: Any, index: int, group_id: str) -> str:
    """The name of episode `index` of a round: the same in a resumed attempt of the round (its
    tasks and groups are drawn from the same seed), different for any other round or task."""
    return f"it{iteration}-{index}-{hashlib.sha1(group_id.encode()).hexdigest()[:10]}"


def _outcome(out: Any) -> tuple[float, bool | None, str]:
    """(reward, success, status) from what the agent returned (success defaults to reward > 0);
    ValueError for a reward that is not a finite number or an unknown status."""
    out = out if isinstance(out, dict) else {"reward": out}
    reward = out.get("reward", 0.0)
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ValueError(f"the agent returned reward {reward!r}; a finite number is needed")
    status = out.get("status", "terminated")
    if status not in ("terminated", "truncated"):
        raise ValueError(f"the agent returned status {status!r}; use 'terminated' or 'truncated'")
    success = out.get("success")
    return float(reward), bool(reward > 0) if success is None else bool(success), status
