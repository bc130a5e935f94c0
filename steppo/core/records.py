"""Step-level records: what each step of an agent saw and produced, as exact token ids.

A `Step` is one transition of the paper's step-level MDP: the state is the token sequence the
policy conditioned on (`prompt_ids`), the action is the whole response (`response_ids`), and the
environment's answer arrives as the next step's prompt. A `Trajectory` is one episode: an ordered
list of steps, the task (group) it came from, and how it ended.

Nothing here decodes or re-tokenises text: the ids are the ids the policy saw and sampled, so the
trainer scores exactly what the rollout produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class RecordError(ValueError):
    """A step or trajectory that cannot be trained on (and why)."""


@dataclass
class Step:
    """One step: context in, whole response out, the scalar reward it earned.

    Attributes:
        prompt_ids: token ids of the state s_t, exactly as fed to the policy; non-empty.
        response_ids: token ids of the action a_t, exactly as sampled; non-empty.
        logprobs: rollout (behaviour-policy) log-prob of each response token; same length as
            `response_ids`.
        reward: r_t, the step's scalar reward (the sum of its token rewards, if any).
        terminated: the episode reached a terminal state after this step (no bootstrap).
        truncated: the episode was cut after this step (step limit, context budget, failure):
            the return is bootstrapped with V(next state).
        response_truncated: the response hit its max-new-tokens budget before a stop token.
        policy_version: version of the weights that sampled this response (for staleness).
        anchor: canonical key of the environment state s_t (GiGPO groups steps by it); `None`
            when the environment gives none.
        info: free metadata (texts, tool-call outcome, timings) carried to logs, never trained on.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    response_truncated: bool = False
    policy_version: int = 0
    anchor: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise RecordError("a step needs a non-empty prompt: the policy conditions on it")
        if len(self.response_ids) == 0:
            raise RecordError("a step needs at least one response token: the action is the response")
        if len(self.logprobs) != len(self.response_ids):
            raise RecordError(
                f"a step has {len(self.response_ids)} response tokens but {len(self.logprobs)} "
                "rollout log-probs; record one log-prob per sampled token"
            )
        if self.terminated and self.truncated:
            raise RecordError("a step cannot be both terminated and truncated")

    @property
    def context_ids(self) -> list[int]:
        """prompt_ids + response_ids: everything the model reads when scoring this step."""
        return list(self.prompt_ids) + list(self.response_ids)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


@dataclass
class Trajectory:
    """One episode: ordered steps of one task.

    Attributes:
        steps: the steps in order; only the last may be terminated or truncated.
        id: unique trajectory id.
        group_id: the task it came from; group estimators (GRPO, RLOO, GiGPO) compare
            trajectories that share it.
        bootstrap_ids: token ids of the state after the last step, when the episode was
            truncated and that state is known; the critic reads V(next state) at its last token.
            Without it a truncated episode bootstraps from the last token of the final response.
        task_id: the task played (None for records built by hand).
        success: whether the environment reported the task solved (None: not known).
        end_reason: why the episode ended (``terminated``, ``truncated``, ``context_overflow``,
            ...; see `steppo.rollout.engine`), None when not known.
        info: free metadata (split, invalid actions, error text), never trained on.
    """

    steps: list[Step]
    id: str
    group_id: str
    bootstrap_ids: list[int] | None = None
    task_id: str | None = None
    success: bool | None = None
    end_reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.steps:
            raise RecordError(f"trajectory {self.id!r} has no steps")
        for i, step in enumerate(self.steps[:-1]):
            if step.done:
                raise RecordError(
                    f"trajectory {self.id!r}: step {i} of {len(self.steps)} ends the episode "
                    "but is not the last step"
                )
        if self.bootstrap_ids is not None and not self.truncated:
            raise RecordError(
                f"trajectory {self.id!r} carries bootstrap_ids but was not truncated: "
                "a terminated or unfinished episode has no state to bootstrap from"
            )

    @property
    def terminated(self) -> bool:
        return self.steps[-1].terminated

    @property
    def truncated(self) -> bool:
        return self.steps[-1].truncated

    @property
    def total_reward(self) -> float:
        return float(sum(step.reward for step in self.steps))

    def __len__(self) -> int:
        return len(self.steps)
