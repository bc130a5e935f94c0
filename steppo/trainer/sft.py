"""Behaviour cloning on expert trajectories (warm start).

Expert episodes are played through the same rollout engine as RL, with a scripted backend that
"generates" the expert's actions, so demonstrations have exactly the prompt ids, context policy
and turn format the policy will see during RL.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from steppo.config import SFTConfig
from steppo.core.batch import StepBatch, build_layout
from steppo.core.losses import aggregation_weights
from steppo.core.records import Trajectory
from steppo.envs.base import Task, TextEnv
from steppo.models.build import load_reference
from steppo.models.chat import ChatFormat
from steppo.models.generation import Sample
from steppo.models.policy import Policy, autocast, load_options, save_merged
from steppo.seeding import derived_seed

if TYPE_CHECKING:
    from steppo.trainer.generation import Generation
    from steppo.trainer.trainer import Trainer


class ScriptedBackend:
    """Answers each episode with its scripted responses, in order (log-probs 0)."""

    def __init__(self, scripts: dict[str, list[list[int]]], end_of_turn_id: int):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.eot = end_of_turn_id

    def generate(self, prompts, max_new_tokens, generators, greedy, keys) -> list[Sample]:
        out = []
        for key in keys:
            script = self.scripts.get(key)
            ids = script.pop(0) if script else [self.eot]
            out.append(Sample(response_ids=ids, logprobs=[0.0] * len(ids), cut=False))
        return out

    def release(self, key: str) -> None:
        self.scripts.pop(key, None)


def expert_trajectories(generation: Generation, env: TextEnv, chat: ChatFormat, tasks: Sequence[Task],
                        seed: int) -> list[Trajectory]:
    """Play each task's expert actions through the run's rollout engine; keep the successful
    episodes."""
    scripts: dict[str, list[list[int]]] = {}
    played: list[Task] = []
    for task in tasks:
        actions = env.expert_actions(task)
        if not actions:
            continue
        scripts[f"sft/{len(played)}"] = [chat.encode(a) + [chat.end_of_turn_id] for a in actions]
        played.append(task)
    with generation.scripted(ScriptedBackend(scripts, chat.end_of_turn_id)) as engine:
        result = engine.run(played, [t.id for t in played], seed, iteration="sft")
    return [t for t in result.trajectories if t.success]


def behaviour_cloning(policy: Policy, demos: Sequence[Trajectory], *, epochs: int, lr: float,
                      batch_trajectories: int, layout: str, pad_id: int, seed: int,
                      dtype: torch.dtype, max_grad_norm: float = SFTConfig.max_grad_norm,
                      progress=None) -> list[float]:
    """Minimise the negative log-likelihood of the demos' action tokens (token mean).

    `max_grad_norm` clips each optimiser step's gradient norm (``sft.max_grad_norm``; 0 = off);
    `progress(epoch, epochs, mean_loss)` is called after each epoch. Returns the mean loss of
    each epoch.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    device = policy.device
    losses = []
    policy.train()
    order = list(range(len(demos)))
    for epoch in range(epochs):
        rng.shuffle(order)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_trajectories):
            group = [demos[i] for i in order[start : start + batch_trajectories]]
            batch = StepBatch.from_trajectories(group)
            lay = build_layout(group, layout, pad_id).to(device)
            w = aggregation_weights("token-mean", batch.token_step, batch.step_traj).to(device)
            with autocast(device, dtype):
                lp, _, _ = policy(lay)
                loss = -(w * lp).sum()
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
            count += 1
        losses.append(total / max(count, 1))
        if progress is not None:
            progress(epoch + 1, epochs, losses[-1])
    policy.eval()
    return losses


def warm_start(trainer: Trainer) -> dict[str, Any]:
    """SFT of the run's policy on expert trajectories of the training split (once per run);
    saves the cloned policy as ``<run>/sft_model`` (a plain model directory, LoRA merged): the
    KL reference of the run and the start of runs that warm-start from it."""
    cfg, models = trainer.cfg, trainer.models
    s = cfg.sft
    rng = random.Random(derived_seed(cfg.run.seed, "sft"))
    tasks = rng.sample(trainer.train_tasks, min(s.demos, len(trainer.train_tasks)))
    t0 = time.perf_counter()
    demos = expert_trajectories(trainer.generation, trainer.env, models.chat, tasks, cfg.run.seed)
    if not demos:
        raise ValueError(f"environment {cfg.env.name} produced no successful expert demonstrations")
    losses = behaviour_cloning(models.policy, demos, epochs=s.epochs, lr=s.lr, batch_trajectories=s.batch_trajectories,
                               layout=cfg.layout, pad_id=trainer.pad_id, seed=cfg.run.seed, dtype=models.dtype,
                               max_grad_norm=s.max_grad_norm,
                               progress=lambda e, n, loss: trainer.say(f"SFT epoch {e}/{n}: loss {loss:.3f} "
                                                                       f"({time.perf_counter() - t0:.0f} s)"))
    trainer.sft_done = True
    trainer.generation.invalidate()
    save_merged(models.policy.model, trainer.sft_dir)
    models.tokenizer.save_pretrained(trainer.sft_dir)
    if cfg.algo.uses_reference:  # with LoRA too: disabling the adapters would undo the SFT
        models.reference = load_reference(trainer.sft_dir, next(models.policy.model.parameters()).dtype,
                                          models.device, cfg.rollout.temperature,
                                          load_options(cfg.model))
    return {"sft/demos": len(demos), "sft/loss_first_epoch": losses[0] if losses else None,
            "sft/loss_last_epoch": losses[-1] if losses else None, "time/sft_s": time.perf_counter() - t0}
