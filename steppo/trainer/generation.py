"""The generation side of a run: one owner for the weights episodes are sampled with.

`Generation` holds the rollout engine and its backend (the local transformers backend, or a
vLLM engine fed the policy's weights), the model the backend generates with, the full unsharded
copy an FSDP policy generates from, and the policy version (optimiser steps of the policy so
far, recorded in every step for staleness). Everything that changes what the generator samples
goes through it:

    gen.updated(policy, trained)   # after an update: refresh the copy, drop caches, version += 1
    gen.snapshot(policy)           # asynchronous training: the weights a rollout thread gets ...
    gen.load(snapshot)             # ... and loads into its own generator model
    with gen.scripted(backend):    # SFT: play expert actions through the same engine

Synchronous training generates with the training model itself (no copy); asynchronous training
gives the generator its own copy, loaded from snapshots, so the update never races a rollout.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from steppo.config import Config, ConfigError
from steppo.envs.base import Task, TextEnv
from steppo.models.build import Models
from steppo.rollout.engine import RolloutEngine, RolloutResult
from steppo.rollout.local import LocalBackend
from steppo.trainer import distributed as dist_lib


def check_first_prompt(cfg: Config, env: TextEnv, chat, task: Task) -> None:
    """A context limit that leaves no room for the first prompt would end every episode
    before its first action (and train on nothing): refused before any work."""
    if env.external:  # an agent builds its own prompts (the gateway refuses over-long ones per call)
        return
    observation, _ = env.reset(task)
    prompt = chat.initial_prompt(env.instructions(), observation, env.chat_tools())
    budget = cfg.rollout.max_new_tokens or env.settings.max_new_tokens
    limit = cfg.rollout.context_limit
    if len(prompt) + budget > limit:
        raise ConfigError(
            f"rollout.context_limit={limit} is too small: the first prompt of training task {task.id!r} is "
            f"{len(prompt)} tokens and a response needs {budget} more (rollout.max_new_tokens), so every "
            f"episode would end before its first action; set rollout.context_limit >= {len(prompt) + budget}"
        )


def make_backend(cfg: Config, models: Models, model: torch.nn.Module):
    """The backend of ``rollout.backend`` generating with `model`."""
    r = cfg.rollout
    stop = {models.chat.end_of_turn_id} | getattr(models.chat, "stop_ids", set())  # + the tokenizer's eos
    if r.backend == "vllm":
        from steppo.models.policy import load_options
        from steppo.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(model, models.base_path, stop, r.temperature, max_model_len=r.context_limit,
                           gpu_memory_utilization=r.vllm_gpu_memory_utilization, seed=cfg.run.seed,
                           dtype=cfg.model.dtype if models.device.type == "cuda" else "float32",
                           options=load_options(cfg.model, weights=False))
    return LocalBackend(model, stop, r.temperature, models.tokenizer.pad_token_id,
                        kv_cache=r.kv_cache and r.context == "cumulative")


class Generation:
    """The rollout engine, its backend, the generator's weights and the policy version.

    Built before the policy is wrapped for data parallelism (an FSDP policy's full copy is made
    from the unsharded weights); `dist` is set once the process group exists."""

    def __init__(self, cfg: Config, models: Models, env: TextEnv, make_env, strategy: str = "none",
                 own_copy: bool | None = None):
        """`own_copy`: the generator gets its own copy of the weights (default: for
        asynchronous training)."""
        self.cfg = cfg
        self.rollout_copy = dist_lib.RolloutCopy(models.policy.model) if strategy == "fsdp" else None
        model = self.rollout_copy.model if self.rollout_copy else models.policy.model
        own = cfg.trainer.async_rollout if own_copy is None else own_copy
        if own and self.rollout_copy is None:
            model = copy.deepcopy(model)
        self.model = model
        self.follows_policy = not own  # refreshed after every update (else: only by `load`)
        self.backend = make_backend(cfg, models, model)
        if env.external:
            from steppo.envs.agent import load_entrypoint
            from steppo.gateway.runner import AgentRunner

            self.engine = AgentRunner(load_entrypoint(env.entrypoint), models, self.backend,
                                      Path(cfg.run.output_dir) / "pool", env.concurrency, cfg.rollout.temperature,
                                      cfg.rollout.max_new_tokens or env.settings.max_new_tokens,
                                      cfg.rollout.context_limit)
        else:
            self.engine = RolloutEngine(make_env, models.chat, self.backend, cfg.rollout, env.instructions(),
                                        env.settings, tools=env.chat_tools())
        self.version = 0
        self.dist = dist_lib.Distributed()

    def play(self, tasks: list[Task], groups: list[str], iteration: Any, greedy: bool = False,
             version: int | None = None) -> RolloutResult:
        """Play `tasks`; data-parallel ranks each play an interleaved share and every rank gets
        the merged result (trajectories in the same order on every rank)."""
        d, seed = self.dist, self.cfg.run.seed
        version = self.version if version is None else version
        if not d.active:
            return self.engine.run(tasks, groups, seed, iteration=iteration, greedy=greedy, policy_version=version)
        mine = list(range(d.rank, len(tasks), d.world))
        part = self.engine.run([tasks[i] for i in mine], [groups[i] for i in mine], seed, iteration=iteration,
                               greedy=greedy, policy_version=version, indices=mine)
        return RolloutResult.merge(d.gather_objects(part.portable()))

    def updated(self, policy: torch.nn.Module, trained: bool) -> None:
        """After an update: the policy version advances when the policy was trained; with a
        shared generator (synchronous training) the FSDP copy is refreshed and the backend's
        caches (or vLLM's weights) follow. An own generator copy is only changed by `load`."""
        if trained:
            self.version += 1
        if self.follows_policy:
            if self.rollout_copy is not None:
                self.rollout_copy.refresh(policy)
            self.backend.invalidate()

    def invalidate(self) -> None:
        """The generator's weights changed in place (e.g. SFT trained them)."""
        self.backend.invalidate()

    def snapshot(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A copy of the policy's current weights, keyed like the generator model."""
        if self.dist.strategy == "fsdp":
            state = dist_lib.full_state_dict(policy)
            return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}

    def load(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Generate with `snapshot` from now on."""
        self.model.load_state_dict(snapshot)
        self.backend.invalidate()

    @contextlib.contextmanager
    def scripted(self, backend) -> Iterator[RolloutEngine]:
        """The engine with `backend` in place of the model's (SFT plays expert actions)."""
        saved = self.engine.backend
        self.engine.backend = backend
        try:
            yield self.engine
        finally:
            self.engine.backend = saved

    def close(self) -> None:
        self.engine.close()

