"""The rollout engine: many episodes at once, generation batched across them, environments in
worker threads, exact token ids from the first prompt to the last response.

Loop (generation runs in the caller's thread)::

    start episodes on free workers (env.reset in a worker thread)
    repeat:
        collect finished env calls -> next prompt ids (context policy) -> episode is ready
        generate one response for every ready episode in one batch (up to max_batch)
        hand each response text to its episode's worker (env.step) and go on

``schedule="continuous"`` generates as soon as any episode is ready, so a slow environment
never stalls the others. ``schedule="rounds"`` waits until every live episode is ready, so
batches (and therefore results) do not depend on thread timing: bitwise reproducible on CPU.

Context policies (how step t+1's prompt is built):

* ``cumulative``: step t's prompt ids + response ids + the observation turn's ids. Nothing is
  re-rendered, so consecutive steps extend each other exactly (prefix-shared training).
* ``window``: the first prompt, then the last ``window`` (response, observation) turns, as the
  exact ids they had: bounded context, still no re-tokenisation.
* ``env``: the environment renders the whole next user message from its state (the paper's
  compression); the prompt is built fresh each step.

A prompt that leaves no room for ``max_new_tokens`` within ``context_limit`` ends the episode
as truncated (reason ``context_overflow``), never a crash. An environment that raises,
returns an invalid result (a ``None`` observation, a non-finite reward, a wrong type: see
`steppo.envs.base.checked_transition`) or exceeds ``step_timeout_s`` ends its episode
(``env_error`` / ``env_timeout``). Such failed episodes are not outcomes of the policy: they
are left out of `RolloutResult.trajectories` (never trained on: the failed step has no real
reward) and of the success rates, and counted apart (``env_failures``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from steppo.config import RolloutSettings  # the config's rollout section (defaults live there)
from steppo.core.choices import CONTEXTS, SCHEDULES, check_choices  # noqa: F401 (importable from here)
from steppo.core.records import Step, Trajectory
from steppo.envs.base import EnvOutputError, EnvSettings, Task, TextEnv, Transition, checked_reset, checked_transition
from steppo.models.chat import ChatFormat
from steppo.models.generation import Sample
from steppo.rollout.workers import EnvWorker, WorkerPool
from steppo.seeding import derived_seed

WORKER_STARTUP_S = 300.0  # longest a replacement worker may take to start before its call times out
FAILED = ("env_error", "env_timeout")  # end reasons of episodes the environment failed (not outcomes)


class RolloutError(RuntimeError):
    """No episode could run at all (every one failed the same way)."""


class GenerationBackend(Protocol):
    """What the engine needs from a generator: one response per prompt."""

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        generators: list[torch.Generator],
        greedy: bool,
        keys: list[str],
    ) -> list[Sample]: ...

    def release(self, key: str) -> None: ...


@dataclass
class Episode:
    index: int
    key: str  # unique within the run: iteration/index, names the episode to the backend
    task: Task
    group_id: str
    generator: torch.Generator
    worker: EnvWorker | None = None
    steps: list[Step] = field(default_factory=list)
    task_text: str = ""
    first_prompt: list[int] = field(default_factory=list)
    turns: list[list[int]] = field(default_factory=list)  # response + observation ids per step
    history: list[tuple[str, str]] = field(default_factory=list)  # (action text, observation)
    prompt: list[int] | None = None
    anchor: str | None = None
    end_reason: str | None = None
    success: bool = False
    invalid_actions: int = 0
    malformed_actions: int = 0
    error: str | None = None
    bootstrap_ids: list[int] | None = None


@dataclass
class RolloutResult:
    """Finished trajectories plus what happened to every episode."""

    def portable(self) -> RolloutResult:
        """A copy that pickles (for gathering across ranks): episodes without their worker
        handle and sampling generator."""
        eps = [dataclasses.replace(e, worker=None, generator=None) for e in self.episodes]
        return dataclasses.replace(self, episodes=eps)

    @staticmethod
    def merge(parts: list[RolloutResult]) -> RolloutResult:
        """One result from the shares data-parallel ranks played (in rank order)."""
        return RolloutResult(
            trajectories=[t for p in parts for t in p.trajectories],
            episodes=[e for p in parts for e in p.episodes],
            generated_tokens=sum(p.generated_tokens for p in parts),
            generation_s=max(p.generation_s for p in parts),
            wall_s=max(p.wall_s for p in parts),
            env_calls=[c for p in parts for c in p.env_calls],
            generation_calls=[c for p in parts for c in p.generation_calls],
        )

    trajectories: list[Trajectory]
    episodes: list[Episode]
    generated_tokens: int
    generation_s: float
    wall_s: float
    env_calls: list[tuple[float, float, int]]  # (start, end, episode) of every env call
    generation_calls: list[tuple[float, float]]
    extra: dict[str, float] = field(default_factory=dict)  # engine-specific counters (gateway/...), logged as they are

    @property
    def failed(self) -> list[Episode]:
        """Episodes the environment failed (``env_error`` / ``env_timeout``)."""
        return [e for e in self.episodes if e.end_reason in FAILED]

    def metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        """Rates over all episodes, except success: over the episodes the environment did not
        fail (``success`` is NaN when it failed them all); failures are ``env_failures``."""
        eps = self.episodes
        n = max(len(eps), 1)
        steps = sum(len(e.steps) for e in eps)
        reasons = Counter(e.end_reason for e in eps)
        valid = [e for e in eps if e.end_reason not in FAILED]
        out = {
            f"{prefix}episodes": float(len(eps)),
            f"{prefix}success": sum(e.success for e in valid) / len(valid) if valid else float("nan"),
            f"{prefix}steps_mean": steps / n,
            f"{prefix}truncated_frac": sum(e.end_reason != "terminated" for e in eps) / n,
            f"{prefix}invalid_action_frac": sum(e.invalid_actions for e in eps) / max(steps, 1),
            f"{prefix}malformed_action_frac": sum(e.malformed_actions for e in eps) / max(steps, 1),
            f"{prefix}response_truncated_frac": sum(s.response_truncated for e in eps for s in e.steps) / max(steps, 1),
            f"{prefix}env_failures": float(reasons["env_error"] + reasons["env_timeout"]),
            f"{prefix}env_failure_frac": (reasons["env_error"] + reasons["env_timeout"]) / n,
            f"{prefix}context_overflows": float(reasons["context_overflow"]),
            f"{prefix}generated_tokens": float(self.generated_tokens),
            f"{prefix}generation_tokens_per_s": self.generated_tokens / max(self.generation_s, 1e-9),
        }
        return {**out, **self.extra} if prefix == "rollout/" else out


def episode_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded from (seed, parts), e.g. (iteration, episode index)."""
    return torch.Generator().manual_seed(derived_seed(seed, parts))


class RolloutEngine:
    """Runs episodes of one environment type with one policy (see module doc)."""

    def __init__(
        self,
        env_factory: Callable[[], TextEnv],
        chat: ChatFormat,
        backend: GenerationBackend,
        settings: RolloutSettings,
        system_prompt: str | None,
        env_settings: EnvSettings,
        stop_ids: set[int] | None = None,
        tools: list[dict] | None = None,
    ):
        """`tools`: the environment's tool schemas for a chat template that presents them
        (`TextEnv.chat_tools`): rendered in every first prompt, and the results of well-formed
        tool calls come back as ``tool`` turns where the template has them."""
        check_choices(settings, "rollout")  # settings built in code skip the config's load-time check
        self.settings = settings
        self.chat = chat
        self.backend = backend
        self.system_prompt = system_prompt
        self.tools = tools
        self.max_steps = env_settings.max_steps
        self.max_new_tokens = settings.max_new_tokens or env_settings.max_new_tokens
        self.stop_ids = set(stop_ids or ()) | {chat.end_of_turn_id}
        self.env_name = str(getattr(env_factory, "name", "env"))
        self.pool = WorkerPool(env_factory, settings.num_envs, settings.env_workers,
                               settings.ray_address, settings.ray_cpus_per_env)
        self._env_calls: list[tuple[float, float, int]] = []

    def close(self) -> None:
        self.pool.close()

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        tasks: list[Task],
        group_ids: list[str],
        seed: int,
        iteration: int = 0,
        greedy: bool = False,
        policy_version: int = 0,
        indices: list[int] | None = None,
    ) -> RolloutResult:
        """Play one episode per task (tasks may repeat for group sampling). `indices` number the
        episodes (default 0..n-1; a data-parallel rank passes its share's global positions, so
        episode ids and sampling seeds do not depend on how tasks were split)."""
        t_start = time.perf_counter()
        indices = list(range(len(tasks))) if indices is None else indices
        episodes = [
            Episode(
                index=i,
                key=f"{iteration}/{i}",
                task=t,
                group_id=g,
                generator=episode_generator(seed, iteration, i),
            )
            for i, t, g in zip(indices, tasks, group_ids)
        ]
        waiting = list(reversed(episodes))
        inflight: dict[Future, tuple[Episode, str, float, float]] = {}  # fut -> (ep, kind, start, deadline)
        ready: list[Episode] = []
        live = 0
        gen_tokens, gen_s = 0, 0.0
        self._env_calls = []
        gen_calls: list[tuple[float, float]] = []
        while waiting or live:
            while waiting and self.pool.free:
                ep = waiting.pop()
                ep.worker = self.pool.acquire()
                live += 1
                self._submit(inflight, ep, "reset", ep.task)
            self._collect(inflight, ready, block=False)
            must_wait = self.settings.schedule == "rounds" and inflight
            if ready and not must_wait:
                ready.sort(key=lambda e: e.index)
                batch, ready[:] = ready[: self.settings.max_batch], ready[self.settings.max_batch:]
                t0 = time.perf_counter()
                samples = self.backend.generate(
                    [e.prompt for e in batch],
                    [self.max_new_tokens] * len(batch),
                    [e.generator for e in batch],
                    greedy,
                    [e.key for e in batch],
                )
                t1 = time.perf_counter()
                gen_s += t1 - t0
                gen_calls.append((t0, t1))
                for ep, sample in zip(batch, samples):
                    gen_tokens += len(sample.response_ids)
                    self._act(inflight, ep, sample, policy_version)
            elif inflight:
                self._collect(inflight, ready, block=True)
            live = sum(1 for e in episodes if e.worker is not None)
        trajectories = [t for t in (self._trajectory(e) for e in episodes) if t is not None]
        failures = [e for e in episodes if e.end_reason == "env_error" and not e.steps]
        if episodes and len(failures) == len(episodes):
            raise RolloutError(f"no episode could start in the environment; first error: {failures[0].error}")
        return RolloutResult(
            trajectories=trajectories,
            episodes=episodes,
            generated_tokens=gen_tokens,
            generation_s=gen_s,
            wall_s=time.perf_counter() - t_start,
            env_calls=list(self._env_calls),
            generation_calls=gen_calls,
        )

    # ------------------------------------------------------------------ env side

    def _submit(self, inflight, ep: Episode, method: str, *args: Any) -> None:
        now = time.perf_counter()
        fut = ep.worker.submit(method, *args)
        inflight[fut] = (ep, method, now, now + self.settings.step_timeout_s)

    def _collect(self, inflight, ready: list[Episode], block: bool) -> None:
        if not inflight:
            return
        if block:
            deadline = min(d for (_, _, _, d) in inflight.values())
            wait(list(inflight), timeout=max(0.0, deadline - time.perf_counter()), return_when=FIRST_COMPLETED)
        now = time.perf_counter()
        for fut in list(inflight):
            ep, method, start, deadline = inflight[fut]
            if fut.done():
                del inflight[fut]
                self._env_calls.append((start, now, ep.index))
                exc = fut.exception()
                if exc is not None:
                    self._fail(ep, "env_error", f"{type(exc).__name__}: {exc}", replace=True)
                    continue
                try:  # the step boundary: a bad result ends this episode, not the run
                    out = fut.result()
                    if method == "reset":
                        args = (*checked_reset(out, self.env_name), None)
                    elif method == "step_and_render":
                        if not isinstance(out, tuple) or len(out) != 2 or not isinstance(out[1], str):
                            raise EnvOutputError(f"{self.env_name}: step_and_render() must return (Transition, str)")
                        args = (checked_transition(out[0], self.env_name), out[1])
                    else:
                        args = (checked_transition(out, self.env_name), None)
                except EnvOutputError as bad:
                    self._fail(ep, "env_error", f"EnvOutputError: {bad}", replace=False)
                    continue
                if method == "reset":
                    self._on_reset(ep, *args[:2], ready=ready)
                else:
                    self._on_step(ep, *args, ready=ready)
            elif now >= deadline and not fut.running() and now < start + WORKER_STARTUP_S:
                # the call has not started: its worker (a fresh process or actor) is still
                # starting up, which does not count against the environment's step timeout
                inflight[fut] = (ep, method, start, now + self.settings.step_timeout_s)
            elif now >= deadline:
                del inflight[fut]
                self._fail(ep, "env_timeout", f"env.{method} exceeded {self.settings.step_timeout_s}s", replace=True)

    def _fail(self, ep: Episode, reason: str, message: str, replace: bool) -> None:
        ep.error = message
        ep.bootstrap_ids = None
        self._finish(ep, reason, replace=replace)

    def _finish(self, ep: Episode, reason: str, replace: bool = False, terminal: bool = False) -> None:
        ep.end_reason = reason
        if ep.steps:
            last = ep.steps[-1]
            last.terminated = terminal or reason == "terminated"
            last.truncated = not last.terminated
        if replace:
            self.pool.replace(ep.worker)
        else:
            self.pool.release(ep.worker)
        ep.worker = None
        self.backend.release(ep.key)

    def _on_reset(self, ep: Episode, observation: str, info: dict, ready: list[Episode]) -> None:
        ep.task_text = observation
        ep.anchor = info.get("anchor")
        ep.first_prompt = self.chat.initial_prompt(self.system_prompt, observation, self.tools)
        self._set_prompt(ep, ep.first_prompt, ready)

    def _set_prompt(self, ep: Episode, prompt: list[int], ready: list[Episode]) -> None:
        if len(prompt) + self.max_new_tokens > self.settings.context_limit:
            ep.error = f"prompt of {len(prompt)} tokens leaves no room for {self.max_new_tokens} new tokens"
            self._finish(ep, "context_overflow")
            return
        ep.prompt = prompt
        ready.append(ep)

    def _act(self, inflight, ep: Episode, sample: Sample, policy_version: int) -> None:
        text = self.chat.decode(sample.response_ids)
        ep.steps.append(
            Step(
                prompt_ids=ep.prompt,
                response_ids=sample.response_ids,
                logprobs=sample.logprobs,
                response_truncated=sample.cut,
                policy_version=policy_version,
                anchor=ep.anchor,
                info={"action": text},
            )
        )
        if self.settings.context == "env":
            self._submit(inflight, ep, "step_and_render", text, ep.task_text, list(ep.history))
        else:
            self._submit(inflight, ep, "step", text)

    def _on_step(self, ep: Episode, result: Transition, rendered: str | None, ready: list[Episode]) -> None:
        step = ep.steps[-1]
        step.reward = float(result.reward)
        step.info["observation"] = result.observation
        info = result.info
        ep.invalid_actions += bool(info.get("invalid_action"))
        ep.malformed_actions += bool(info.get("malformed"))
        ep.success = bool(info.get("success", ep.success))
        ep.anchor = info.get("anchor")
        ep.history.append((step.info["action"], result.observation))
        closed = not step.response_truncated
        tool_result = self.tools is not None and not info.get("malformed")
        turn = step.response_ids + self.chat.observation_ids(result.observation, closed, tool_result)
        ep.turns.append(turn)
        if result.terminated:
            self._finish(ep, "terminated")
            return
        next_prompt = self._next_prompt(ep, step, turn, rendered)
        if result.truncated or len(ep.steps) >= self.max_steps:
            reason = "env_truncated" if result.truncated else "max_steps"
            if self.settings.bootstrap_time_limit:
                fits = len(next_prompt) <= self.settings.context_limit
                ep.bootstrap_ids = next_prompt if fits else None
                self._finish(ep, reason)
            else:
                self._finish(ep, reason, terminal=True)
            return
        self._set_prompt(ep, next_prompt, ready)

    def _next_prompt(self, ep: Episode, step: Step, turn: list[int], rendered: str | None) -> list[int]:
        ctx = self.settings.context
        if ctx == "cumulative":
            return step.prompt_ids + turn
        if ctx == "window":
            kept = ep.turns[-self.settings.window:] if self.settings.window > 0 else []
            return ep.first_prompt + [t for turn_ids in kept for t in turn_ids]
        return self.chat.initial_prompt(self.system_prompt, rendered, self.tools)

    # ------------------------------------------------------------------ records

    def _trajectory(self, ep: Episode) -> Trajectory | None:
        """The episode as training data; None without steps, or when the environment failed it
        (its last step has no real reward, and a bootstrap would credit the crash)."""
        if not ep.steps or ep.end_reason in FAILED:
            return None
        return Trajectory(
            steps=ep.steps,
            id=f"{ep.task.id}#{ep.index}",
            group_id=ep.group_id,
            bootstrap_ids=ep.bootstrap_ids if ep.steps[-1].truncated else None,
            task_id=ep.task.id,
            success=ep.success,
            end_reason=ep.end_reason,
            info={
                "split": ep.task.split,
                "invalid_actions": ep.invalid_actions,
                "error": ep.error,
            },
        )
