"""Behaviour cloning on expert trajectories (warm start).

Expert episodes are played through the same rollout engine as RL, with a scripted backend that
"generates" the expert's actions, so demonstrations have exactly the prompt ids, context policy
and turn format the policy will see during RL.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from steppo.core.batch import StepBatch, build_layout
from steppo.core.losses import aggregation_weights
from steppo.core.records import Trajectory
from steppo.envs.base import Task, TextEnv
from steppo.models.chat import ChatFormat
from steppo.models.generation import Sample
from steppo.models.policy import Policy, autocast
from steppo.rollout.engine import RolloutEngine


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


def expert_trajectories(engine: RolloutEngine, env: TextEnv, chat: ChatFormat, tasks: Sequence[Task],
                        seed: int) -> list[Trajectory]:
    """Play each task's expert actions through `engine`; keep the successful episodes."""
    scripts: dict[str, list[list[int]]] = {}
    played: list[Task] = []
    for task in tasks:
        actions = env.expert_actions(task)
        if not actions:
            continue
        scripts[f"sft/{len(played)}"] = [chat.encode(a) + [chat.end_of_turn_id] for a in actions]
        played.append(task)
    saved = engine.backend
    engine.backend = ScriptedBackend(scripts, chat.end_of_turn_id)
    try:
        result = engine.run(played, [t.id for t in played], seed, iteration="sft")
    finally:
        engine.backend = saved
    return [t for t in result.trajectories if t.info.get("success")]


def behaviour_cloning(policy: Policy, demos: Sequence[Trajectory], *, epochs: int, lr: float,
                      batch_trajectories: int, layout: str, pad_id: int, seed: int,
                      dtype: torch.dtype, progress=None) -> list[float]:
    """Minimise the negative log-likelihood of the demos' action tokens (token mean).

    Returns the mean loss of each epoch.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    device = policy.device
    losses = []
    policy.train()
    order = list(range(len(demos)))
    for _ in range(epochs):
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
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
            count += 1
            if progress is not None:
                progress()
        losses.append(total / max(count, 1))
    policy.eval()
    return losses
