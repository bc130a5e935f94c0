"""The trainer: rollout -> credit assignment -> clipped updates -> metrics -> checkpoint.

    trainer = Trainer(load_config(overrides=["algo=steppo", "trainer.iterations=50"]))
    trainer.train()            # optional SFT warm start, then RL with periodic validation

Every source of randomness is derived from (run.seed, iteration, ...) rather than carried
state, so a run resumed from a checkpoint replays the same iterations as an uninterrupted one
(with ``rollout.schedule=rounds`` bitwise on CPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from steppo.config import Config, ConfigError
from steppo.core.batch import StepBatch, input_tokens
from steppo.core.losses import ratio_units, staleness_weights
from steppo.core.records import Trajectory
from steppo.envs.base import Task, TextEnv
from steppo.envs.registry import env_factory
from steppo.models.build import Models, build_models, load_reference, resolve_base_model
from steppo.models.policy import resolve_device, save_merged
from steppo.rollout.engine import RolloutEngine, RolloutResult
from steppo.rollout.local import LocalBackend
from steppo.trainer import checkpoint as ckpt
from steppo.trainer import distributed as dist_lib
from steppo.trainer.sft import behaviour_cloning, expert_trajectories
from steppo.trainer.tracking import RunLog
from steppo.trainer.update import (
    Optimiser,
    UpdateSettings,
    compute_credit,
    critic_metrics,
    ppo_update,
    score_batch,
)


def derived_seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def env_corpus(env: TextEnv, tasks: list[Task], limit: int | None = None) -> list[str]:
    """Text a tokenizer for this environment should know: prompts, expert actions and the
    observations they lead to (on the first `limit` training tasks, default the environment's
    `corpus_tasks`)."""
    texts = [env.instructions()]
    for task in tasks[: limit or env.corpus_tasks]:
        obs, _ = env.reset(task)
        texts.append(obs)
        for action in env.expert_actions(task) or []:
            texts.append(action)
            result = env.step(action)
            texts.append(result.observation)
            if result.terminated or result.truncated:
                break
    return texts


class Trainer:
    """Owns the models, optimisers, rollout engine and run directory of one run."""

    def __init__(self, config: Config, resume: bool = False, log: Callable[[str], None] = print):
        self.cfg = config.validate()
        self.out = Path(self.cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        strategy = dist_lib.resolve_strategy(self.cfg.trainer.parallel, launched)
        rank, world = (0, 1)
        if strategy != "none":  # an explicit ddp/fsdp in one process runs on a 1-rank group
            rank, world = dist_lib.init_process_group(resolve_device(self.cfg.model.device))
        self.say = log if rank == 0 else (lambda *_: None)
        seed_everything(self.cfg.run.seed)
        self.make_env = env_factory(self.cfg.env)
        self.env = self.make_env()  # for tasks, prompts and expert actions (not stepped by rollouts)
        self.train_tasks = self.env.tasks(self.cfg.env.train_split)
        self.eval_tasks = self.env.tasks(self.cfg.env.eval_split)[: self.cfg.trainer.eval_episodes]
        if not self.train_tasks:
            raise ValueError(f"environment {self.cfg.env.name} has no tasks in split {self.cfg.env.train_split!r}")
        if {t.id for t in self.train_tasks} & {t.id for t in self.eval_tasks}:
            raise ValueError("training and evaluation splits share tasks")
        algo = self.cfg.algo
        m = self.cfg.model
        resume_from = ckpt.latest_checkpoint(self.out / "checkpoints") if resume else None
        if strategy != "none" and self.cfg.trainer.async_rollout and world > 1:
            raise ConfigError("trainer.async_rollout runs on one process for now (its rollout thread and the "
                              "update would issue collectives concurrently); use trainer.parallel=none")
        if strategy != "none" and self.cfg.sft_enabled and resume_from is None:
            raise ConfigError("the SFT warm start runs in one process: run `steppo sft ...` first, then train "
                              "on several processes with model.name=<run>/sft_model sft.enabled=false")
        base = None
        for turn in range(world):  # rank 0 builds the tiny model/tokenizer (if needed) first, the others load it
            if turn == rank:
                base = resolve_base_model(
                    m.name, self.out, lambda: env_corpus(self.make_env(), self.train_tasks), m.tiny_size,
                    m.tiny_vocab, self.cfg.run.seed, self.cfg.run.cache_dir,
                )
            if world > 1 and turn == 0:
                dist_lib.Distributed(rank, world).barrier()
        self.sft_dir = self.out / "sft_model"  # the warm-started policy: KL reference of the run
        if resume and resume_from is None:
            self.say(f"no checkpoint under {self.out / 'checkpoints'}; starting fresh")
        self.models: Models = build_models(
            m, base_path=base, with_critic=algo.critic, shared_critic=self.cfg.critic.shared,
            with_reference=algo.uses_reference, temperature=self.cfg.rollout.temperature,
            policy_dir=resume_from / "policy" if resume_from else None,
            reference_path=self.sft_dir if (self.sft_dir / "config.json").exists() else None,
        )
        self.pad_id = self.models.tokenizer.pad_token_id
        if resume_from is not None and self.models.critic is not None:
            ckpt.load_critic(self.models.critic, resume_from)
        # FSDP: generation and checkpoints use full copies made before sharding
        self.rollout_copy = dist_lib.RolloutCopy(self.models.policy.model) if strategy == "fsdp" else None
        self.critic_copy = copy.deepcopy(self.models.critic) if strategy == "fsdp" and self.models.critic else None
        self.dist = dist_lib.wrap(self.models.policy, self.models.critic, strategy, rank, world)
        policy_params = [p for p in self.models.policy.parameters() if p.requires_grad]
        warmup = self.cfg.trainer.lr_warmup_steps
        self.policy_opt = Optimiser(policy_params, self.cfg.trainer.policy_lr, warmup)
        critic = self.models.critic
        self.critic_opt = None
        if critic is not None:
            own = [p for n, p in critic.named_parameters() if p.requires_grad]
            self.critic_opt = Optimiser(own, self.cfg.trainer.critic_lr, warmup)
        self.engine = RolloutEngine(
            self.make_env,
            self.models.chat,
            self._backend(),
            self.cfg.rollout,
            self.env.instructions(),
            self.env.settings,
        )
        self.iteration = 0
        self.policy_version = 0
        self.env_steps = 0
        self.sft_done = False
        if resume_from is not None:
            self._restore(resume_from)
        if self.dist.is_main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            self.runlog = RunLog(
                self.out, self.cfg.run.trackers, self.cfg.to_dict(), self.cfg.run.wandb_project,
                self.cfg.run.mlflow_uri, resume_after=self.iteration if resume_from else None,
            )
        else:
            self.runlog = _NoLog()
        if resume_from is not None:
            self.say(f"resumed from {resume_from} (next iteration {self.iteration + 1})")

    def _backend(self):
        """The generator: the training model itself, or a vLLM engine fed its weights."""
        r = self.cfg.rollout
        model = self.rollout_copy.model if self.rollout_copy else self.models.policy.model
        if self.cfg.trainer.async_rollout and self.rollout_copy is None:
            model = copy.deepcopy(model)  # the rollout thread's own weights, loaded from snapshots
        self.generator_model = model
        stop = {self.models.chat.end_of_turn_id}
        if r.backend == "vllm":
            from steppo.rollout.vllm_backend import VLLMBackend

            return VLLMBackend(model, self.models.base_path, stop, r.temperature, max_model_len=r.context_limit,
                               gpu_memory_utilization=r.vllm_gpu_memory_utilization, seed=self.cfg.run.seed,
                               dtype=self.cfg.model.dtype if self.models.device.type == "cuda" else "float32")
        return LocalBackend(model, stop, r.temperature, self.pad_id,
                            kv_cache=r.kv_cache and r.context == "cumulative")

    # ------------------------------------------------------------------ checkpoints

    def _restore(self, path: Path) -> None:
        """Trainer state of a checkpoint (weights were loaded before wrapping the models)."""
        state = ckpt.load_trainer_state(path)
        self.iteration = state["iteration"]
        self.policy_version = state["policy_version"]
        self.env_steps = state["env_steps"]
        self.sft_done = state.get("sft_done", True)
        self._load_opt(self.policy_opt, self.models.policy, state["policy_opt"])
        if self.models.critic is not None:
            self._load_opt(self.critic_opt, self.models.critic, state["critic_opt"])
        ckpt.set_rng_state(state["rng"])

    def _opt_state(self, opt: Optimiser, module: torch.nn.Module) -> dict:
        """Single-process layout whatever the world size, so runs resume on any number of ranks."""
        return {"opt": dist_lib.full_optimizer_state(self.dist, module, opt.opt), "sched": opt.sched.state_dict()}

    def _load_opt(self, opt: Optimiser, module: torch.nn.Module, state: dict) -> None:
        dist_lib.load_optimizer_state(self.dist, module, opt.opt, state["opt"])
        opt.sched.load_state_dict(state["sched"])

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank takes part in gathering sharded state)."""
        state = {
            "iteration": self.iteration,
            "policy_version": self.policy_version,
            "env_steps": self.env_steps,
            "sft_done": self.sft_done,
            "policy_opt": self._opt_state(self.policy_opt, self.models.policy),
            "critic_opt": self._opt_state(self.critic_opt, self.models.critic) if self.critic_opt else None,
        }
        policy_model, critic = self.models.policy.model, self.models.critic
        if self.dist.strategy == "fsdp":
            policy_model = self.rollout_copy.model  # refreshed after every update
            if self.critic_copy is not None:
                self.critic_copy.load_state_dict(dist_lib.full_state_dict(self.models.critic))
                critic = self.critic_copy
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.out / "checkpoints", self.iteration, policy_model, self.models.tokenizer,
                critic, state, self.cfg.trainer.keep_checkpoints,
            )
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ pieces

    def sample_tasks(self, iteration: int) -> tuple[list[Task], list[str]]:
        """trajectories_per_iteration / group_size training tasks, each group_size times."""
        g = self.cfg.algo.group_size
        n = self.cfg.trainer.trajectories_per_iteration // g
        rng = random.Random(derived_seed(self.cfg.run.seed, "tasks", iteration))
        picked = rng.sample(self.train_tasks, n) if n <= len(self.train_tasks) else rng.choices(self.train_tasks, k=n)
        tasks = [t for t in picked for _ in range(g)]
        groups = [f"{t.id}@{iteration}" for t in tasks]
        return tasks, groups

    def rollout(self, tasks: list[Task], groups: list[str], iteration: Any, greedy: bool = False,
                policy_version: int | None = None) -> RolloutResult:
        """Play `tasks`; data-parallel ranks each play an interleaved share and every rank gets
        the merged result (trajectories in the same order on every rank)."""
        d = self.dist
        version = self.policy_version if policy_version is None else policy_version
        if not d.active:
            return self.engine.run(tasks, groups, self.cfg.run.seed, iteration=iteration, greedy=greedy,
                                   policy_version=version)
        mine = list(range(d.rank, len(tasks), d.world))
        part = self.engine.run([tasks[i] for i in mine], [groups[i] for i in mine], self.cfg.run.seed,
                               iteration=iteration, greedy=greedy, policy_version=version, indices=mine)
        return RolloutResult.merge(d.gather_objects(part.portable()))

    def evaluate(self, tag: Any, greedy: bool = True) -> dict[str, float]:
        if self.cfg.trainer.async_rollout:  # the rollout thread's generator holds a snapshot
            self._load_generator(self._policy_snapshot())
        result = self.rollout(self.eval_tasks, [t.id for t in self.eval_tasks],
                              f"eval-{tag}-{'greedy' if greedy else 'sampled'}", greedy=greedy)
        prefix = "eval/" if greedy else "eval_sampled/"
        metrics = result.metrics(prefix)
        metrics[f"{prefix}score"] = float(np.mean([t.total_reward for t in result.trajectories])) if result.trajectories else 0.0
        return metrics

    def warm_start(self) -> dict[str, Any]:
        """SFT on expert trajectories of the training split (once per run)."""
        s = self.cfg.sft
        rng = random.Random(derived_seed(self.cfg.run.seed, "sft"))
        tasks = rng.sample(self.train_tasks, min(s.demos, len(self.train_tasks)))
        t0 = time.perf_counter()
        demos = expert_trajectories(self.engine, self.env, self.models.chat, tasks, self.cfg.run.seed)
        if not demos:
            raise ValueError(f"environment {self.cfg.env.name} produced no successful expert demonstrations")
        losses = behaviour_cloning(
            self.models.policy, demos, epochs=s.epochs, lr=s.lr, batch_trajectories=s.batch_trajectories,
            layout=self.cfg.layout, pad_id=self.pad_id, seed=self.cfg.run.seed, dtype=self.models.dtype,
        )
        self.sft_done = True
        self.engine.backend.invalidate()
        # A plain model directory (LoRA adapters merged): the KL reference of this run, and the
        # starting point (model.name=<run>/sft_model) of runs that warm-start from this one.
        save_merged(self.models.policy.model, self.sft_dir)
        self.models.tokenizer.save_pretrained(self.sft_dir)
        if self.cfg.algo.uses_reference:  # with LoRA too: disabling the adapters would undo the SFT
            self.models.reference = load_reference(self.sft_dir, next(self.models.policy.model.parameters()).dtype,
                                                   self.models.device, self.cfg.rollout.temperature)
        return {"sft/demos": len(demos), "sft/loss_first_epoch": losses[0] if losses else None,
                "sft/loss_last_epoch": losses[-1] if losses else None, "time/sft_s": time.perf_counter() - t0}

    def train_iteration(self) -> dict[str, Any]:
        """One rollout + update; returns the iteration's metrics."""
        it = self.iteration + 1
        t0 = time.perf_counter()
        tasks, groups = self.sample_tasks(it)
        result: RolloutResult = self.rollout(tasks, groups, it)
        return self.learn(it, result, time.perf_counter() - t0)

    def learn(self, it: int, result: RolloutResult, rollout_s: float, wait_s: float | None = None) -> dict[str, Any]:
        """Credit assignment and the update on one iteration's episodes; the iteration's metrics.

        `rollout_s`: time the rollout took; `wait_s` (asynchronous training): time the update
        loop waited for it (the part not hidden behind the previous update).
        """
        cfg, algo = self.cfg, self.cfg.algo
        stale = cfg.trainer.async_rollout
        trajs = result.trajectories
        t1 = time.perf_counter()
        metrics: dict[str, Any] = {"iteration": it}
        metrics.update(result.metrics("rollout/"))
        steps = sum(len(t.steps) for t in trajs)
        self.env_steps += sum(len(e.steps) for e in result.episodes)
        metrics["env_steps"] = self.env_steps
        metrics["train/reward_mean"] = float(np.mean([t.total_reward for t in trajs])) if trajs else 0.0
        metrics["train/success"] = metrics["rollout/success"]
        if trajs:
            batch = StepBatch.from_trajectories(trajs)
            layout = cfg.layout
            scored = score_batch(self.models, algo, trajs, batch, layout, cfg.trainer.micro_batch_tokens, self.pad_id,
                                 cfg.trainer.row_tokens, dist=self.dist)
            drift = float((scored.logprobs - batch.old_logprobs).abs().max())
            credit = compute_credit(algo, batch, scored)
            if stale:
                # behaviour policy (rollout log-probs) vs proximal policy (this update's start)
                lag = [self.policy_version - s.policy_version for t in trajs for s in t.steps]
                units, n_units = ratio_units(algo.ratio_level, batch.token_step, batch.token_traj)
                w = staleness_weights(scored.logprobs, batch.old_logprobs, units, n_units, cfg.trainer.is_truncation)
                credit.token_advantages = credit.token_advantages * w
                metrics["async/staleness_mean"] = float(np.mean(lag))
                metrics["async/staleness_max"] = float(max(lag))
                metrics["async/is_weight_mean"] = float(w.mean())
                metrics["async/is_weight_truncated_frac"] = float((w >= cfg.trainer.is_truncation).float().mean())
                metrics["async/behaviour_logprob_drift_max_abs"] = drift
            else:
                metrics["rollout/logprob_parity_max_abs"] = drift
            settings = UpdateSettings(
                epochs=cfg.trainer.epochs, minibatch_steps=cfg.trainer.minibatch_steps,
                micro_batch_tokens=cfg.trainer.micro_batch_tokens, max_grad_norm=cfg.trainer.max_grad_norm,
                layout=layout, old_logprobs=cfg.trainer.old_logprobs, row_tokens=cfg.trainer.row_tokens,
                train_policy=it > self.cfg.critic.warmup_iterations or not algo.critic,
            )
            rng = random.Random(derived_seed(cfg.run.seed, "minibatch", it))
            metrics.update(ppo_update(self.models, algo, settings, trajs, batch, scored, credit,
                                      self.policy_opt, self.critic_opt, rng, self.pad_id, dist=self.dist))
            metrics.update(critic_metrics(credit, scored, algo))
            metrics["credit/advantage_mean"] = float(credit.step_advantages.mean())
            metrics["credit/advantage_std"] = float(credit.step_advantages.std()) if steps > 1 else 0.0
            for k in range(min(int(batch.step_index.max()) + 1, 8)):
                sel = batch.step_index == k
                metrics[f"credit/advantage_step{k}"] = float(credit.step_advantages[sel].mean())
            if settings.train_policy:
                self.policy_version += 1
            if not stale:  # asynchronous: the rollout thread loads its own snapshot of the weights
                if self.rollout_copy is not None:
                    self.rollout_copy.refresh(self.models.policy)
                self.engine.backend.invalidate()
            self._log_samples(it, trajs[: cfg.trainer.sample_trajectories], scored, credit)
            tokens = sum(len(t.steps[-1].context_ids) for t in trajs)
            trained = cfg.trainer.epochs * input_tokens(trajs, layout)
        else:
            tokens = trained = 0
        t2 = time.perf_counter()
        metrics["time/rollout_s"] = rollout_s
        metrics["time/update_s"] = t2 - t1
        if wait_s is not None:
            metrics["time/rollout_wait_s"] = wait_s
        iteration_s = (wait_s if wait_s is not None else rollout_s) + (t2 - t1)
        metrics["time/iteration_s"] = iteration_s
        metrics["throughput/tokens_per_s"] = (result.generated_tokens + tokens) / max(iteration_s, 1e-9)
        metrics["throughput/rollout_tokens_per_s"] = result.generated_tokens / max(rollout_s, 1e-9)
        metrics["throughput/update_tokens_per_s"] = trained / max(t2 - t1, 1e-9)
        metrics["policy_version"] = self.policy_version
        self.iteration = it
        return metrics

    # ------------------------------------------------------------------ asynchronous rollout

    def _policy_snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the policy's current weights, keyed like the generator model."""
        if self.dist.strategy == "fsdp":
            state = dist_lib.full_state_dict(self.models.policy)
            return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return {k: v.detach().clone() for k, v in self.models.policy.model.state_dict().items()}

    def _load_generator(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.generator_model.load_state_dict(snapshot)
        self.engine.backend.invalidate()

    def _async_rollout(self, it: int, snapshot: dict[str, torch.Tensor], version: int) -> tuple[RolloutResult, float]:
        """Runs in the rollout thread: the episodes of iteration `it` with weights `snapshot`."""
        t0 = time.perf_counter()
        self._load_generator(snapshot)
        tasks, groups = self.sample_tasks(it)
        result = self.rollout(tasks, groups, it, policy_version=version)
        return result, time.perf_counter() - t0

    def _log_samples(self, it: int, trajs: list[Trajectory], scored, credit) -> None:
        records, s = [], 0
        tok = self.models.tokenizer
        for b, traj in enumerate(trajs):
            steps = []
            for step in traj.steps:
                steps.append({
                    "prompt_text": tok.decode(step.prompt_ids[-200:]),
                    "response_text": tok.decode(step.response_ids),
                    "prompt_ids": step.prompt_ids,
                    "response_ids": step.response_ids,
                    "reward": step.reward,
                    "value": float(scored.step_values[s]) if scored.step_values is not None else None,
                    "advantage": float(credit.step_advantages[s]),
                    "observation": step.info.get("observation"),
                })
                s += 1
            records.append({"iteration": it, "trajectory": traj.id, "task": traj.info.get("task_id"),
                            "success": traj.info.get("success"), "end_reason": traj.info.get("end_reason"),
                            "steps": steps})
        self.runlog.samples(records)

    # ------------------------------------------------------------------ the run

    def train(self, progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
        """SFT warm start (if enabled), validation before RL, iterations, validation after."""
        cfg = self.cfg
        summary: dict[str, Any] = {}
        if cfg.sft_enabled and not self.sft_done:
            sft = self.warm_start()
            summary.update(sft)
            self.say(f"warm start: {sft['sft/demos']} expert demos, loss {sft['sft/loss_first_epoch']:.3f} -> {sft['sft/loss_last_epoch']:.3f}")
        if self.iteration == 0:
            before = self.evaluate("before")
            if cfg.trainer.eval_sampled:
                before.update(self.evaluate("before", greedy=False))
            self.runlog.log({"iteration": 0, "env_steps": 0, **before, **{k: v for k, v in summary.items() if k.startswith(("sft/", "time/"))}})
            for mode in ("eval", "eval_sampled"):
                if f"{mode}/success" in before:
                    summary[f"{mode}/success_before"] = before[f"{mode}/success"]
            self.say(f"held-out success before RL: {self._describe(before)}")
        if cfg.trainer.async_rollout:
            self._train_async(progress, summary)
        while not self.finished:
            self._after_update(self.train_iteration(), progress, summary)
        for mode in ("eval", "eval_sampled"):
            if f"{mode}/success" in summary.get("last", {}):
                summary[f"{mode}/success_after"] = summary["last"][f"{mode}/success"]
        if "last" in summary:
            self.say(f"held-out success after RL: {self._describe(summary['last'])}")
        return summary

    def _after_update(self, metrics: dict, progress, summary: dict, drain: Callable[[], None] = lambda: None) -> None:
        """Validation, logging and checkpoints after an update (`drain`: wait for rollouts in
        flight before validation uses the rollout engine)."""
        cfg = self.cfg
        it, last = self.iteration, self.finished
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

    def _train_async(self, progress, summary: dict) -> None:
        """Asynchronous training: while the trainer updates on iteration k, a rollout thread
        plays iteration k+1 (up to `trainer.staleness` iterations ahead) with a snapshot of the
        weights taken when it was launched. Each step records the policy version that sampled
        it; `learn` corrects the lag with truncated step-level importance weights (decoupled
        PPO, see `steppo.core.losses.staleness_weights`). An interrupted run resumes from its
        last checkpoint; rollouts that were in flight are played again with the restored
        weights (so a resumed asynchronous run is not bitwise identical to an uninterrupted one).
        """
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        cfg = self.cfg
        pool = ThreadPoolExecutor(1, thread_name_prefix="steppo-rollout")
        inflight: deque = deque()
        next_it = self.iteration + 1

        def launch() -> None:
            nonlocal next_it
            if next_it <= cfg.trainer.iterations:
                inflight.append((next_it, pool.submit(self._async_rollout, next_it, self._policy_snapshot(),
                                                      self.policy_version)))
                next_it += 1

        def drain() -> None:
            for _, fut in inflight:
                fut.result()

        try:
            while len(inflight) < cfg.trainer.staleness and next_it <= cfg.trainer.iterations:
                launch()
            while not self.finished and inflight:
                it, fut = inflight.popleft()
                t0 = time.perf_counter()
                result, rollout_s = fut.result()
                waited = time.perf_counter() - t0
                launch()  # plays while this update runs
                self._after_update(self.learn(it, result, rollout_s, wait_s=waited), progress, summary, drain)
        finally:
            for _, fut in inflight:
                fut.cancel()
            pool.shutdown(wait=True)

    @property
    def finished(self) -> bool:
        """The iteration limit, or the environment-step budget, is reached."""
        budget = self.cfg.trainer.max_env_steps
        return self.iteration >= self.cfg.trainer.iterations or (budget > 0 and self.env_steps >= budget)

    def _describe(self, metrics: dict) -> str:
        parts = [f"{metrics['eval/success']:.3f} greedy"]
        if "eval_sampled/success" in metrics:
            parts.append(f"{metrics['eval_sampled/success']:.3f} sampled (T={self.cfg.rollout.temperature})")
        return ", ".join(parts) + f" on {len(self.eval_tasks)} {self.cfg.env.eval_split} episodes"

    def close(self) -> None:
        self.engine.close()
        self.runlog.close()
        if self.dist.strategy != "none" and torch.distributed.is_initialized():
            self.dist.barrier()  # no rank tears the group down while another is still in a collective
            torch.distributed.destroy_process_group()


class _NoLog:
    """The run log of ranks other than 0 (which writes the run directory)."""

    def log(self, metrics: dict) -> None:
        pass

    def samples(self, records: list) -> None:
        pass

    def close(self) -> None:
        pass
