"""The trainer: rollout -> credit assignment -> clipped updates -> metrics -> checkpoint.

    trainer = Trainer(load_config(overrides=["algo=steppo", "trainer.iterations=50"]))
    trainer.train()            # optional SFT warm start, then RL with periodic validation

One iteration reads top to bottom: `train_iteration` samples tasks and plays them
(`steppo.trainer.generation`), `learn` hands the episodes to `steppo.trainer.update.update`
(score -> credit -> staleness -> clipped loss), then `_after_update` validates
(`steppo.evaluate`), logs (`steppo.trainer.tracking`) and checkpoints
(`steppo.trainer.checkpoint`). Asynchronous training is `steppo.trainer.asynchronous`.

Every source of randomness is derived from (run.seed, iteration, ...) (`steppo.seeding`), so a
run resumed from a checkpoint replays the same iterations as an uninterrupted one (with
``rollout.schedule=rounds`` bitwise on CPU).
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from steppo.config import Config, ConfigError, preflight
from steppo.envs.base import Task
from steppo.envs.registry import env_factory, with_tools
from steppo.evaluate import describe, evaluate, success_of
from steppo.models.build import Models, build_models, resolve_base_model
from steppo.models.builtin import env_corpus
from steppo.models.policy import resolve_device
from steppo.rollout.engine import RolloutResult
from steppo.seeding import derived_seed, seed_everything
from steppo.trainer import checkpoint as ckpt
from steppo.trainer import distributed as dist_lib
from steppo.trainer import rundir
from steppo.trainer.generation import Generation, check_first_prompt
from steppo.trainer.sft import warm_start
from steppo.trainer.tracking import NoLog, RunLog, sample_records
from steppo.trainer.update import NonFiniteGuard, Optimiser, check_finite_weights, update


class Trainer:
    """Owns the models, optimisers, generation side and run directory of one run."""

    def __init__(self, config: Config, resume: bool = False, log: Callable[[str], None] = print,
                 overwrite: bool = False):
        """`resume`: continue the run in ``run.output_dir`` from its newest intact checkpoint
        (the config should be the run's own, see `steppo.config.resume_config`); `overwrite`:
        delete the run already in ``run.output_dir`` first. Without either, a directory that
        holds a run is refused (one run per directory)."""
        self.cfg = config.validate()
        self.out = Path(self.cfg.run.output_dir)
        if resume and overwrite:
            raise ConfigError("--resume continues the run in run.output_dir and --overwrite deletes it; pass one")
        main = os.environ.get("RANK", "0") == "0"  # the process group does not exist yet
        fresh = main and not resume and not rundir.run_files(self.out)
        if main:
            rundir.prepare_run_dir(self.out, resume, overwrite, log)
        preflight(self.cfg)
        existed = self.out.exists()
        try:
            self._init(resume, log)
        except BaseException:
            if fresh or (main and overwrite):  # a failed start leaves nothing behind: the fixed command can run here
                rundir.remove_run(self.out)
                if not existed and self.out.is_dir() and not any(self.out.iterdir()):
                    self.out.rmdir()
            raise

    def _init(self, resume: bool, log: Callable[[str], None]) -> None:
        cfg, m = self.cfg, self.cfg.model
        self.out.mkdir(parents=True, exist_ok=True)
        strategy = dist_lib.resolve_strategy(cfg.trainer.parallel, int(os.environ.get("WORLD_SIZE", "1")))
        rank, world = (0, 1)
        if strategy != "none":  # an explicit ddp/fsdp in one process runs on a 1-rank group
            rank, world = dist_lib.init_process_group(resolve_device(m.device))
        self.say = log if rank == 0 else (lambda *_: None)
        seed_everything(cfg.run.seed)
        self.make_env = env_factory(cfg.env)
        self.env = self.make_env()  # for tasks, prompts and expert actions (not stepped by rollouts)
        self.train_tasks = self.env.tasks(cfg.env.train_split)
        self.eval_tasks = self.env.tasks(cfg.env.eval_split)[: cfg.trainer.eval_episodes]
        if not self.train_tasks:
            raise ValueError(f"environment {cfg.env.name} has no tasks in split {cfg.env.train_split!r}")
        if {t.id for t in self.train_tasks} & {t.id for t in self.eval_tasks}:
            raise ValueError("training and evaluation splits share tasks")
        self.run_id = rundir.run_id(self.out, rank == 0)
        resume_from, state = None, None
        if resume:
            resume_from, state, broken = ckpt.find_resumable(self.out / "checkpoints", self.say,
                                                             self.run_id if rank == 0 else None)
            if rank == 0:
                rundir.clean_for_resume(self.out, self.run_id, resume_from, broken, self.say)
        if strategy != "none" and cfg.trainer.async_rollout and world > 1:
            raise ConfigError("trainer.async_rollout runs on one process for now (its rollout thread and the "
                              "update would issue collectives concurrently); use trainer.parallel=none")
        if strategy != "none" and cfg.sft_enabled and resume_from is None:
            raise ConfigError("the SFT warm start runs in one process: run `steppo sft ...` first, then train "
                              "on several processes with model.name=<run>/sft_model sft.enabled=false")
        base = None
        for turn in range(world):  # rank 0 builds the tiny model/tokenizer (if needed) first, the others load it
            if turn == rank:
                base = resolve_base_model(m.name, self.out, lambda: env_corpus(self.make_env(), self.train_tasks),
                                          m.tiny_size, m.tiny_vocab, cfg.run.seed, cfg.run.cache_dir)
            if world > 1 and turn == 0:
                dist_lib.Distributed(rank, world).barrier()
        self.sft_dir = self.out / "sft_model"  # the warm-started policy: KL reference of the run
        self.models: Models = build_models(
            m, base_path=base, with_critic=cfg.algo.critic, shared_critic=cfg.critic.shared,
            with_reference=cfg.algo.uses_reference, temperature=cfg.rollout.temperature,
            policy_dir=resume_from / "policy" if resume_from else None,
            reference_path=self.sft_dir if (self.sft_dir / "config.json").exists() else None,
        )
        self.pad_id = self.models.tokenizer.pad_token_id
        self.make_env = with_tools(self.make_env, self.models.chat)  # tool calls the model's own way
        self.env.settings = self.make_env.settings
        check_first_prompt(cfg, self.env, self.models.chat, self.train_tasks[0])
        if resume_from is not None and self.models.critic is not None:
            ckpt.load_critic(self.models.critic, resume_from)
        # FSDP: generation (Generation.rollout_copy) and checkpoints use full copies made before sharding
        self.generation = Generation(cfg, self.models, self.env, self.make_env, strategy)
        self.critic_copy = copy.deepcopy(self.models.critic) if strategy == "fsdp" and self.models.critic else None
        self.dist = self.generation.dist = dist_lib.wrap(self.models.policy, self.models.critic, strategy, rank, world)
        t = cfg.trainer
        self.policy_opt = Optimiser([p for p in self.models.policy.parameters() if p.requires_grad], t.policy_lr,
                                    t.lr_warmup_steps)
        critic = self.models.critic
        self.critic_opt = None if critic is None else Optimiser(
            [p for p in critic.parameters() if p.requires_grad], t.critic_lr, t.lr_warmup_steps)
        self.iteration = self.env_steps = 0
        self.sft_done = False
        self.nonfinite_guard = NonFiniteGuard(t.max_nonfinite_updates)  # skipped steps in a row, across iterations
        if resume_from is not None:  # weights were loaded before wrapping the models
            ckpt.restore_trainer(self, ckpt.load_trainer_state(resume_from) if state is None else state)
        self.runlog = NoLog()
        if self.dist.is_main:
            rundir.record_attempt(self.out, self.iteration)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.runlog = RunLog(self.out, cfg.run, cfg.to_dict(), say=self.say,
                                 resume_after=self.iteration if resume_from else (-1 if resume else None))
        if resume_from is not None:
            self.say(f"resumed from {resume_from} (next iteration {self.iteration + 1})")

    @property
    def engine(self):
        return self.generation.engine

    @property
    def policy_version(self) -> int:
        return self.generation.version

    def save(self) -> Path | None:
        """Write a checkpoint (see `steppo.trainer.checkpoint.save_trainer`)."""
        return ckpt.save_trainer(self)

    # ------------------------------------------------------------------ pieces

    def sample_tasks(self, iteration: int) -> tuple[list[Task], list[str]]:
        """trajectories_per_iteration / group_size training tasks, each group_size times."""
        g = self.cfg.algo.group_size
        n = self.cfg.trainer.trajectories_per_iteration // g
        rng = random.Random(derived_seed(self.cfg.run.seed, "tasks", iteration))
        picked = rng.sample(self.train_tasks, n) if n <= len(self.train_tasks) else rng.choices(self.train_tasks, k=n)
        tasks = [t for t in picked for _ in range(g)]
        return tasks, [f"{t.id}@{iteration}" for t in tasks]

    def rollout(self, tasks: list[Task], groups: list[str], iteration: Any, greedy: bool = False,
                policy_version: int | None = None) -> RolloutResult:
        return self.generation.play(tasks, groups, iteration, greedy, policy_version)

    def evaluate(self, tag: Any, greedy: bool = True) -> dict[str, float]:
        """Held-out metrics (``eval/...`` greedy, ``eval_sampled/...`` sampled); each task's
        outcome is appended to ``evals.jsonl``."""
        if self.cfg.trainer.async_rollout:  # the rollout thread's generator holds a snapshot
            self.generation.load(self.generation.snapshot(self.models.policy))
        return evaluate(self.generation, self.eval_tasks, greedy, tag, runlog=self.runlog, say=self.say)

    def warm_start(self) -> dict[str, Any]:
        """SFT on expert trajectories of the training split (see `steppo.trainer.sft.warm_start`)."""
        return warm_start(self)

    def train_iteration(self) -> dict[str, Any]:
        """One rollout + update; returns the iteration's metrics."""
        it = self.iteration + 1
        t0 = time.perf_counter()
        tasks, groups = self.sample_tasks(it)
        return self.learn(it, self.rollout(tasks, groups, it), time.perf_counter() - t0)

    def learn(self, it: int, result: RolloutResult, rollout_s: float, wait_s: float | None = None) -> dict[str, Any]:
        """The update on one iteration's episodes; the iteration's metrics. `rollout_s`: time the
        rollout took; `wait_s` (asynchronous training): time the update loop waited for it."""
        cfg, t1 = self.cfg, time.perf_counter()
        metrics: dict[str, Any] = {"iteration": it, **result.metrics("rollout/")}
        # Group estimators compare a task's episodes with each other: a group missing a failed
        # episode would be normalised over the rest, so the whole group is left out.
        failed_groups = {e.group_id for e in result.failed} if cfg.algo.group_size > 1 else set()
        trajs = [t for t in result.trajectories if t.group_id not in failed_groups]  # failed episodes have none
        metrics["rollout/groups_dropped"] = float(len(failed_groups))
        metrics["rollout/episodes_dropped"] = float(len(result.episodes) - len(trajs))
        self.env_steps += sum(len(e.steps) for e in result.episodes)
        metrics["env_steps"] = self.env_steps
        metrics["train/reward_mean"] = float(np.mean([t.total_reward for t in trajs])) if trajs else 0.0
        metrics["train/success"] = metrics["rollout/success"]
        tokens = trained = 0
        if trajs:
            train_policy = it > cfg.critic.warmup_iterations or not cfg.algo.critic
            self.nonfinite_guard.iteration = it
            step_metrics, scored, credit, trained, ratios = update(
                self.models, cfg, trajs, self.policy_opt, self.critic_opt,
                random.Random(derived_seed(cfg.run.seed, "minibatch", it)), self.pad_id, self.dist,
                self.nonfinite_guard, train_policy, self.policy_version)
            metrics.update(step_metrics)
            check_finite_weights(it, self.models, self.dist)
            self.generation.updated(self.models.policy, train_policy)
            self.runlog.samples(sample_records(it, trajs[: cfg.trainer.sample_trajectories], scored, credit,
                                               self.models.tokenizer, ratios))
            tokens = sum(len(t.steps[-1].context_ids) for t in trajs)
        t2 = time.perf_counter()
        iteration_s = (wait_s if wait_s is not None else rollout_s) + (t2 - t1)
        metrics["policy/lr"] = self.policy_opt.sched.get_last_lr()[0]
        metrics.update({"time/rollout_s": rollout_s, "time/update_s": t2 - t1, "time/iteration_s": iteration_s,
                        "throughput/tokens_per_s": (result.generated_tokens + tokens) / max(iteration_s, 1e-9),
                        "throughput/rollout_tokens_per_s": result.generated_tokens / max(rollout_s, 1e-9),
                        "throughput/update_tokens_per_s": trained / max(t2 - t1, 1e-9),
                        "policy_version": self.policy_version,
                        "rollout/context_tokens": tokens,  # final context of every trained episode
                        "update/tokens": trained})  # tokens the update forwarded
        if wait_s is not None:
            metrics["time/rollout_wait_s"] = wait_s
        self.iteration = it
        return metrics

    # ------------------------------------------------------------------ the run

    def train(self, progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
        """SFT warm start (if enabled), validation before RL, iterations, validation after."""
        cfg = self.cfg
        summary: dict[str, Any] = {}
        if cfg.sft_enabled and not self.sft_done:
            sft = self.warm_start()
            summary.update(sft)
            self.say(f"warm start: {sft['sft/demos']} expert demos, loss {sft['sft/loss_first_epoch']:.3f} -> "
                     f"{sft['sft/loss_last_epoch']:.3f}")
        if self.iteration == 0:
            before = self.evaluate("before")
            if cfg.trainer.eval_sampled:
                before.update(self.evaluate("before", greedy=False))
            self.runlog.log({"iteration": 0, "env_steps": 0, **before,
                             **{k: v for k, v in summary.items() if k.startswith(("sft/", "time/"))}})
            for mode in ("eval", "eval_sampled"):
                if f"{mode}/success" in before:
                    summary[f"{mode}/success_before"] = success_of(before, mode)
            self.say(f"held-out success before RL: {describe(before, cfg, len(self.eval_tasks))}")
        if cfg.trainer.async_rollout:
            from steppo.trainer.asynchronous import train_async

            train_async(self, progress, summary)
        while not self.finished:
            self._after_update(self.train_iteration(), progress, summary)
        for mode in ("eval", "eval_sampled"):
            if f"{mode}/success" in summary.get("last", {}):
                summary[f"{mode}/success_after"] = success_of(summary["last"], mode)
        if "last" in summary:
            self.say(f"held-out success after RL: {describe(summary['last'], cfg, len(self.eval_tasks))}")
        return summary

    def _after_update(self, metrics: dict, progress, summary: dict, drain: Callable[[], None] = lambda: None) -> None:
        """Validation, logging and checkpoints after an update (`drain`: wait for rollouts in
        flight before validation uses the rollout engine)."""
        cfg, it, last = self.cfg, self.iteration, self.finished
        if (cfg.trainer.eval_interval and it % cfg.trainer.eval_interval == 0) or last:
            drain()
            metrics.update(self.evaluate(it))
            if cfg.trainer.eval_sampled:
                metrics.update(self.evaluate(it, greedy=False))
        self.runlog.log(metrics)
        if (cfg.trainer.checkpoint_interval and it % cfg.trainer.checkpoint_interval == 0) or last:
            self.save()
        if progress is not None:
            progress(it, cfg.trainer.iterations, metrics)
        summary["last"] = metrics

    @property
    def finished(self) -> bool:
        """The iteration limit, or the environment-step budget, is reached."""
        budget = self.cfg.trainer.max_env_steps
        return self.iteration >= self.cfg.trainer.iterations or (budget > 0 and self.env_steps >= budget)

    def close(self) -> None:
        self.generation.close()
        self.runlog.close()
        if self.dist.strategy != "none" and torch.distributed.is_initialized():
            self.dist.barrier()  # no rank tears the group down while another is still in a collective
            torch.distributed.destroy_process_group()
