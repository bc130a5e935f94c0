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
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from steppo.config import Config, ConfigError, preflight
from steppo.core.batch import StepBatch, input_tokens
from steppo.core.records import Trajectory
from steppo.envs.base import EnvError, Task, TextEnv, checked_reset, checked_transition
from steppo.envs.registry import env_factory
from steppo.models.build import Models, build_models, load_reference, resolve_base_model
from steppo.models.policy import resolve_device, save_merged
from steppo.rollout.engine import FAILED, RolloutEngine, RolloutResult
from steppo.rollout.local import LocalBackend
from steppo.trainer import checkpoint as ckpt
from steppo.trainer import distributed as dist_lib
from steppo.trainer.sft import behaviour_cloning, expert_trajectories
from steppo.trainer.tracking import RunLog
from steppo.trainer.update import (
    NonFiniteError,
    NonFiniteGuard,
    Optimiser,
    UpdateSettings,
    compute_credit,
    correct_staleness,
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


class EnvCorpusError(EnvError, ConfigError):
    """The environment failed on its own tasks while the tokenizer corpus was built (before any
    training): a refused start, like a config error, naming the environment, task and call."""


def env_corpus(env: TextEnv, tasks: list[Task], limit: int | None = None) -> list[str]:
    """Text a tokenizer for this environment should know: prompts, expert actions and the
    observations they lead to (on the first `limit` training tasks, default the environment's
    `corpus_tasks`).

    An environment that raises or returns an invalid result here (on its own training tasks
    and expert actions) is refused with `EnvCorpusError` naming the environment, the task and
    the call: the tokenizer is built once per run, so skipping tasks would silently change it,
    and an environment that cannot replay its expert actions would fail SFT and rollouts too.
    """
    name = getattr(env, "name", type(env).__name__)
    texts = [env.instructions()]
    for task in tasks[: limit or env.corpus_tasks]:
        call = "reset()"
        try:
            obs, _ = checked_reset(env.reset(task), name)
            texts.append(obs)
            for i, action in enumerate(env.expert_actions(task) or []):
                call = f"step({action!r}) (expert action {i})"
                texts.append(action)
                result = checked_transition(env.step(action), name)
                texts.append(result.observation)
                if result.terminated or result.truncated:
                    break
        except Exception as exc:  # noqa: BLE001 - any failure: a clear error naming env and task
            raise EnvCorpusError(
                f"environment {name!r} failed on training task {task.id!r} while building the tokenizer corpus, "
                f"in {call}: {type(exc).__name__}: {exc}"
            ) from exc
    return texts


class Trainer:
    """Owns the models, optimisers, rollout engine and run directory of one run."""

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
        fresh = main and not resume and not run_files(self.out)
        if main:
            prepare_run_dir(self.out, resume, overwrite, log)
        preflight(self.cfg)
        existed = self.out.exists()
        try:
            self._init(resume, log)
        except BaseException:
            if fresh or (main and overwrite):  # a failed start leaves nothing behind: the fixed command can run here
                for name in run_files(self.out):
                    _remove(self.out / name)
                if not existed and self.out.is_dir() and not any(self.out.iterdir()):
                    self.out.rmdir()
            raise

    def _init(self, resume: bool, log: Callable[[str], None]) -> None:
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
        self.run_id = self._run_id(rank == 0)
        resume_from, state = None, None
        if resume:
            resume_from, state, broken = ckpt.find_resumable(self.out / "checkpoints", self.say,
                                                             self.run_id if rank == 0 else None)
            if rank == 0:
                self._clean_for_resume(resume_from, broken)
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
        self.models: Models = build_models(
            m, base_path=base, with_critic=algo.critic, shared_critic=self.cfg.critic.shared,
            with_reference=algo.uses_reference, temperature=self.cfg.rollout.temperature,
            policy_dir=resume_from / "policy" if resume_from else None,
            reference_path=self.sft_dir if (self.sft_dir / "config.json").exists() else None,
        )
        self.pad_id = self.models.tokenizer.pad_token_id
        self._check_first_prompt()
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
        # counts skipped non-finite optimiser steps in a row, across iterations
        self.nonfinite_guard = NonFiniteGuard(self.cfg.trainer.max_nonfinite_updates)
        if resume_from is not None:
            self._restore(resume_from, state)
        if self.dist.is_main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            self.runlog = RunLog(
                self.out, self.cfg.run.trackers, self.cfg.to_dict(), self.cfg.run.wandb_project,
                self.cfg.run.mlflow_uri, say=self.say,
                resume_after=self.iteration if resume_from else (-1 if resume else None),
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

    def _run_id(self, main: bool) -> str | None:
        """This run's id (``run.json``), recorded in every checkpoint's manifest so pruning and
        resuming only ever touch the run's own checkpoints."""
        path = self.out / "run.json"
        try:
            return json.loads(path.read_text())["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            if not main:
                return None
        run_id = uuid.uuid4().hex
        path.write_text(json.dumps({"run_id": run_id}) + "\n")
        return run_id

    def _clean_for_resume(self, resume_from: Path | None, broken: list[Path]) -> None:
        """Rank 0, resuming: drop what an interrupted attempt left (temporary checkpoint
        directories, checkpoints that failed verification); with no intact checkpoint at all,
        start the run again from iteration 0 (its records are cleared by `RunLog`)."""
        root = self.out / "checkpoints"
        for p in ckpt.remove_stale_tmp(root):
            self.say(f"removed {p} (left by an interrupted save)")
        for p in broken:
            manifest = ckpt.read_manifest(p) or {}
            if manifest.get("run_id") not in (None, self.run_id):
                continue  # not this run's: leave it alone
            shutil.rmtree(p, ignore_errors=True)
            self.say(f"removed unusable checkpoint {p}")
        if resume_from is None:
            self.say(f"no intact checkpoint under {root}: starting this run again from iteration 0 with its "
                     f"config (clearing metrics.jsonl, samples.jsonl and tensorboard/ of the interrupted attempt)")
            (root / ckpt.LATEST).unlink(missing_ok=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
        elif root.joinpath(ckpt.LATEST).exists() and (root / ckpt.LATEST).read_text().strip() != resume_from.name:
            (root / ckpt.LATEST).write_text(resume_from.name)

    def _check_first_prompt(self) -> None:
        """A context limit that leaves no room for the first prompt would end every episode
        before its first action (and train on nothing): refused before any work."""
        task = self.train_tasks[0]
        observation, _ = self.env.reset(task)
        prompt = self.models.chat.initial_prompt(self.env.instructions(), observation)
        budget = self.cfg.rollout.max_new_tokens or self.env.settings.max_new_tokens
        limit = self.cfg.rollout.context_limit
        if len(prompt) + budget > limit:
            raise ConfigError(
                f"rollout.context_limit={limit} is too small: the first prompt of training task {task.id!r} is "
                f"{len(prompt)} tokens and a response needs {budget} more (rollout.max_new_tokens), so every "
                f"episode would end before its first action; set rollout.context_limit >= {len(prompt) + budget}"
            )

    def _restore(self, path: Path, state: dict | None = None) -> None:
        """Trainer state of a checkpoint (weights were loaded before wrapping the models)."""
        state = ckpt.load_trainer_state(path) if state is None else state
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
                critic, state, self.cfg.trainer.keep_checkpoints, run_id=self.run_id,
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
        metrics: dict[str, Any] = result.metrics(prefix)
        metrics[f"{prefix}score"] = float(np.mean([t.total_reward for t in result.trajectories])) if result.trajectories else 0.0
        failed, n = len(result.failed), len(result.episodes)
        self._record_outcomes(tag, greedy, result)
        metrics[f"{prefix}valid"] = not eval_invalid(failed, n)
        if not metrics[f"{prefix}valid"]:  # not a score: most episodes never got a fair run
            metrics[f"{prefix}success"] = metrics[f"{prefix}score"] = float("nan")
            self.say(f"warning: evaluation {tag} ({'greedy' if greedy else 'sampled'}) is not valid: "
                     f"{failed} of {n} episodes failed in the environment (env_error/env_timeout; first error: "
                     f"{result.failed[0].error})")
        return metrics

    def _record_outcomes(self, tag: Any, greedy: bool, result: RolloutResult) -> None:
        """Append each held-out task's outcome to ``evals.jsonl`` (main process): one line per
        validation, ``outcomes`` in `eval_tasks` order, ``1`` success, ``0`` failure, ``x`` an
        episode the environment failed. Paired task-level statistics (`steppo compare`) read it."""
        if not self.dist.is_main:
            return
        by_task = {e.task.id: ("x" if e.end_reason in FAILED else str(int(bool(e.success)))) for e in result.episodes}
        line = {"iteration": 0 if tag == "before" else tag, "mode": "greedy" if greedy else "sampled",
                "first_task": self.eval_tasks[0].id if self.eval_tasks else None,
                "outcomes": "".join(by_task.get(t.id, "x") for t in self.eval_tasks)}
        with (self.out / "evals.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

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
        trajs = result.trajectories  # without the episodes the environment failed
        t1 = time.perf_counter()
        metrics: dict[str, Any] = {"iteration": it}
        metrics.update(result.metrics("rollout/"))
        # Group estimators compare a task's episodes with each other: a group missing a failed
        # episode would be normalised over the rest, so the whole group is left out.
        failed_groups = {e.group_id for e in result.failed} if algo.group_size > 1 else set()
        if failed_groups:
            trajs = [t for t in trajs if t.group_id not in failed_groups]
        metrics["rollout/groups_dropped"] = float(len(failed_groups))
        metrics["rollout/episodes_dropped"] = float(len(result.episodes) - len(trajs))
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
                # behaviour policy (rollout log-probs) vs proximal policy (this update's start):
                # advantages times the truncated weight, ratio against the proximal policy
                lag = [self.policy_version - s.policy_version for t in trajs for s in t.steps]
                w = correct_staleness(algo, batch, scored, credit, cfg.trainer.is_truncation,
                                      cfg.trainer.old_logprobs)
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
            guard = self.nonfinite_guard
            guard.iteration = it
            metrics.update(ppo_update(self.models, algo, settings, trajs, batch, scored, credit,
                                      self.policy_opt, self.critic_opt, rng, self.pad_id, dist=self.dist,
                                      guard=guard))
            self._check_finite_weights(it)
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

    def _check_finite_weights(self, it: int) -> None:
        """Refuse to go on (and so ever to save) with non-finite policy or critic weights."""
        bad = []
        for label, module in (("policy", self.models.policy), ("critic", self.models.critic)):
            if module is None:
                continue
            for name, p in module.named_parameters():
                t = p.detach()
                t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 shard
                if t.numel() and not bool(torch.isfinite(t).all()):
                    bad.append(f"{label}.{name}")
        if self.dist.max_int(len(bad)) > 0:
            raise NonFiniteError(f"iteration {it}: non-finite weights after the update ({', '.join(bad[:3]) or 'on another rank'}"
                                 f"{'...' if len(bad) > 3 else ''}); stopping without saving them")

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
                    summary[f"{mode}/success_before"] = _success(before, mode)
            self.say(f"held-out success before RL: {self._describe(before)}")
        if cfg.trainer.async_rollout:
            self._train_async(progress, summary)
        while not self.finished:
            self._after_update(self.train_iteration(), progress, summary)
        for mode in ("eval", "eval_sampled"):
            if f"{mode}/success" in summary.get("last", {}):
                summary[f"{mode}/success_after"] = _success(summary["last"], mode)
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
        def fmt(mode: str) -> str:
            v = _success(metrics, mode)
            return v if isinstance(v, str) else f"{v:.3f}"

        parts = [f"{fmt('eval')} greedy"]
        if "eval_sampled/success" in metrics:
            parts.append(f"{fmt('eval_sampled')} sampled (T={self.cfg.rollout.temperature})")
        return ", ".join(parts) + f" on {len(self.eval_tasks)} {self.cfg.env.eval_split} episodes"

    def close(self) -> None:
        self.engine.close()
        self.runlog.close()
        if self.dist.strategy != "none" and torch.distributed.is_initialized():
            self.dist.barrier()  # no rank tears the group down while another is still in a collective
            torch.distributed.destroy_process_group()


def eval_invalid(failed: int, episodes: int) -> bool:
    """An evaluation is not a score when more than half its episodes failed in the environment."""
    return episodes > 0 and failed * 2 > episodes


def _success(metrics: dict, mode: str) -> float | str:
    """The held-out success of `mode` (eval / eval_sampled), or, for an evaluation that is not
    valid, the text ``n/a (k of n episodes failed in the environment)``."""
    if metrics.get(f"{mode}/valid", True):
        return metrics[f"{mode}/success"]
    k, n = int(metrics[f"{mode}/env_failures"]), int(metrics[f"{mode}/episodes"])
    return f"n/a ({k} of {n} episodes failed in the environment)"


# What makes a directory a run's (other files, e.g. a comparison's protocol.yaml, are left alone).
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "evals.jsonl", "samples.jsonl", "checkpoints", "base_model",
             "sft_model", "tensorboard", "wandb")


def run_files(out: Path) -> list[str]:
    """The run files present in `out` (empty: no run there)."""
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, say: Callable[[str], None]) -> None:
    """One run per directory: a new run into a directory holding another one is refused
    (it would reuse that run's tokenizer and mix metrics and checkpoints) unless `overwrite`,
    which deletes the old run's files first."""
    found = run_files(out)
    if resume or not found:
        return
    if not overwrite:
        raise ConfigError(
            f"run.output_dir={out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
            f"--overwrite to delete it and start again, or choose another run.output_dir"
        )
    say(f"--overwrite: deleting the previous run in {out}: {', '.join(found)}")
    for name in found:
        _remove(out / name)


class _NoLog:
    """The run log of ranks other than 0 (which writes the run directory)."""

    def log(self, metrics: dict) -> None:
        pass

    def samples(self, records: list) -> None:
        pass

    def close(self) -> None:
        pass
