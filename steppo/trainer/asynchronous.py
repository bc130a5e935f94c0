"""Asynchronous training: rollouts of the next iterations overlap the update of this one.

While the trainer updates on iteration k, a rollout thread plays iteration k+1 (up to
``trainer.staleness`` iterations ahead) with a snapshot of the weights taken when it was
launched (`Generation.snapshot` / `Generation.load`: the generator has its own copy of the
weights, so an update never changes a rollout in flight). Each step records the policy version
that sampled it; the update corrects the lag with truncated step-level importance weights
(decoupled PPO: `steppo.trainer.update.correct_staleness`, `steppo.core.losses.staleness_weights`).

An interrupted run resumes from its last checkpoint; rollouts that were in flight are played
again with the restored weights (so a resumed asynchronous run is not bitwise identical to an
uninterrupted one).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from steppo.rollout.engine import RolloutResult

if TYPE_CHECKING:
    from steppo.trainer.trainer import Trainer


def _rollout(trainer: Trainer, it: int, snapshot: dict[str, torch.Tensor], version: int) -> tuple[RolloutResult, float]:
    """Runs in the rollout thread: the episodes of iteration `it` with weights `snapshot`."""
    t0 = time.perf_counter()
    trainer.generation.load(snapshot)
    tasks, groups = trainer.sample_tasks(it)
    result = trainer.rollout(tasks, groups, it, policy_version=version)
    return result, time.perf_counter() - t0


def train_async(trainer: Trainer, progress: Callable[[int, int, dict], None] | None, summary: dict[str, Any]) -> None:
    """Train until `trainer.finished`, one rollout thread ahead of the updates."""
    cfg, gen = trainer.cfg, trainer.generation
    pool = ThreadPoolExecutor(1, thread_name_prefix="steppo-rollout")
    inflight: deque = deque()
    next_it = trainer.iteration + 1

    def launch() -> None:
        nonlocal next_it
        if next_it <= cfg.trainer.iterations:
            snapshot = gen.snapshot(trainer.models.policy)
            inflight.append((next_it, pool.submit(_rollout, trainer, next_it, snapshot, gen.version)))
            next_it += 1

    def drain() -> None:
        for _, fut in inflight:
            fut.result()

    try:
        while len(inflight) < cfg.trainer.staleness and next_it <= cfg.trainer.iterations:
            launch()
        while not trainer.finished and inflight:
            it, fut = inflight.popleft()
            t0 = time.perf_counter()
            result, rollout_s = fut.result()
            waited = time.perf_counter() - t0
            launch()  # plays while this update runs
            trainer._after_update(trainer.learn(it, result, rollout_s, wait_s=waited), progress, summary, drain)
    finally:
        for _, fut in inflight:
            fut.cancel()
        pool.shutdown(wait=True)
