"""From trajectories to training tensors: a per-step view and two token layouts.

Indexing conventions (used across the core):

* ``B`` trajectories, ``S`` steps in all, ``N`` action (response) tokens in all,
  ``T`` = most steps in one trajectory, ``K`` = most action tokens in one trajectory.
* Steps and action tokens have one *canonical order*: trajectory by trajectory, step by step,
  token by token. Every flat per-step tensor is ``(S,)`` and every flat per-token tensor ``(N,)``
  in that order, whatever the token layout.
* ``StepBatch`` holds the per-step facts (rewards, flags, groups, lengths, rollout log-probs)
  and the maps between flat tensors and padded per-trajectory timelines (``(B, T)`` for steps,
  ``(B, K)`` for tokens), which credit assignment uses.
* A ``TokenLayout`` says where each action token and each state-value read sits in the model's
  input rows. Two layouts exist and give the same per-step numbers:

Per-step layout, one row per step (the reference layout)::

    row 0: [ p0 p0 p0 | a0 a0 ]              step 0: prompt p0, response a0
    row 1: [ p0 p0 p0 a0 a0 o0 o0 | a1 a1 a1 ]   step 1: prompt = p0 a0 o0 (cumulative)
    row 2: [ q0 q0 | b0 ]                    step 0 of another trajectory
                 ^ value read here (last prompt token) for each row's step

Prefix-shared layout, one row per chain of steps whose prompt extends the previous step's
prompt + response exactly::

    row 0: [ p0 p0 p0 a0 a0 o0 o0 a1 a1 a1 ]
                   ^  [span0]    ^ [span1 ]      value of step t read just before its span
    row 1: [ q0 q0 b0 ]

Action tokens are at ``(action_rows, action_cols)``; the log-prob of the token at column ``c``
comes from the model's output at ``c - 1``, and so does the token-level value of that token's
state. The step value V_t is read at ``(value_rows, value_cols)`` = the column just before the
step's first action token. A truncated trajectory's bootstrap state V(s_{T+1}) is read at
``(bootstrap_rows, bootstrap_cols)`` (``-1`` for trajectories that need none). Because a model
is causal and both layouts start every row at position 0 with the same tokens before each read,
the same model gives the same numbers in both layouts; the prefix-shared one reads each shared
token once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from steppo.core.records import Trajectory

LAYOUTS = ("per_step", "prefix_shared")


def _anchor_ids(trajectories: Sequence[Trajectory], group: torch.Tensor) -> list[int]:
    """Dense id per step for (group, anchor key); -1 where a step has no anchor key."""
    table: dict[tuple[int, str], int] = {}
    out: list[int] = []
    for b, traj in enumerate(trajectories):
        g = int(group[b])
        for step in traj.steps:
            if step.anchor is None:
                out.append(-1)
            else:
                out.append(table.setdefault((g, step.anchor), len(table)))
    return out


@dataclass
class StepBatch:
    """Per-step facts of a batch of trajectories, independent of the token layout.

    Shapes: ``step_slots (B, T)``, ``token_slots (B, K)``; ``step_traj, step_index, rewards,
    response_lengths, anchor, policy_version (S,)``; ``terminated, truncated, group (B,)``;
    ``token_step, token_traj, old_logprobs (N,)``. Slots hold the flat index or -1 for padding.
    """

    step_slots: torch.Tensor
    token_slots: torch.Tensor
    step_traj: torch.Tensor
    step_index: torch.Tensor
    rewards: torch.Tensor
    response_lengths: torch.Tensor
    anchor: torch.Tensor
    policy_version: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    group: torch.Tensor
    token_step: torch.Tensor
    token_traj: torch.Tensor
    old_logprobs: torch.Tensor

    @property
    def num_trajectories(self) -> int:
        return self.step_slots.shape[0]

    @property
    def num_steps(self) -> int:
        return self.step_traj.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_step.shape[0]

    @cached_property
    def step_mask(self) -> torch.Tensor:
        """(B, T) bool: real steps."""
        return self.step_slots >= 0

    @cached_property
    def token_mask(self) -> torch.Tensor:
        """(B, K) bool: real action tokens."""
        return self.token_slots >= 0

    @cached_property
    def _step_cells(self) -> torch.Tensor:
        """(S,) index of each step in the flattened (B, T) grid."""
        return self.step_traj * self.step_slots.shape[1] + self.step_index

    @cached_property
    def _token_cells(self) -> torch.Tensor:
        """(N,) index of each action token in the flattened (B, K) grid."""
        first = (torch.cumsum(self.token_mask.sum(1), 0) - self.token_mask.sum(1))[self.token_traj]
        return self.token_traj * self.token_slots.shape[1] + torch.arange(self.num_tokens) - first

    @cached_property
    def step_end(self) -> torch.Tensor:
        """(B, K) bool: the token is the last one of its step."""
        flat_end = torch.zeros(self.num_tokens, dtype=torch.bool)
        if self.num_tokens:
            ends = torch.cumsum(self.response_lengths, 0) - 1
            flat_end[ends] = True
        return self.tokens_to_padded(flat_end, False)

    def steps_to_padded(self, flat: torch.Tensor, fill: float | bool = 0.0) -> torch.Tensor:
        """(S,) -> (B, T), `fill` at padding."""
        return _scatter_padded(flat, self._step_cells, self.step_slots.shape, fill)

    def tokens_to_padded(self, flat: torch.Tensor, fill: float | bool = 0.0) -> torch.Tensor:
        """(N,) -> (B, K), `fill` at padding."""
        return _scatter_padded(flat, self._token_cells, self.token_slots.shape, fill)

    def padded_to_steps(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (S,)."""
        return padded.reshape(-1)[self._step_cells]

    def padded_to_tokens(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, K) -> (N,)."""
        return padded.reshape(-1)[self._token_cells]

    def steps_to_tokens(self, per_step: torch.Tensor) -> torch.Tensor:
        """(S,) -> (N,): copy each step's value to each of its action tokens."""
        return per_step[self.token_step]

    def trajectories_to_steps(self, per_traj: torch.Tensor) -> torch.Tensor:
        """(B,) -> (S,)."""
        return per_traj[self.step_traj]

    def last_step(self) -> torch.Tensor:
        """(B,) flat index of each trajectory's last step."""
        counts = self.step_mask.sum(1)
        return torch.cumsum(counts, 0) - 1

    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Trajectory]) -> "StepBatch":
        group_names: dict[str, int] = {}
        group = torch.tensor(
            [group_names.setdefault(t.group_id, len(group_names)) for t in trajectories],
            dtype=torch.long,
        )
        steps_per_traj = torch.tensor([len(t.steps) for t in trajectories], dtype=torch.long)
        lengths = torch.tensor(
            [len(s.response_ids) for t in trajectories for s in t.steps], dtype=torch.long
        )
        tokens_per_traj = torch.tensor(
            [sum(len(s.response_ids) for s in t.steps) for t in trajectories], dtype=torch.long
        )
        B = len(trajectories)
        step_traj = torch.repeat_interleave(torch.arange(B), steps_per_traj)
        step_index = _ranges(steps_per_traj)
        token_step = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        return cls(
            step_slots=_slots(steps_per_traj),
            token_slots=_slots(tokens_per_traj),
            step_traj=step_traj,
            step_index=step_index,
            rewards=torch.tensor(
                [s.reward for t in trajectories for s in t.steps], dtype=torch.float32
            ),
            response_lengths=lengths,
            anchor=torch.tensor(_anchor_ids(trajectories, group), dtype=torch.long),
            policy_version=torch.tensor(
                [s.policy_version for t in trajectories for s in t.steps], dtype=torch.long
            ),
            terminated=torch.tensor([t.terminated for t in trajectories], dtype=torch.bool),
            truncated=torch.tensor([t.truncated for t in trajectories], dtype=torch.bool),
            group=group,
            token_step=token_step,
            token_traj=step_traj[token_step],
            old_logprobs=torch.tensor(
                [lp for t in trajectories for s in t.steps for lp in s.logprobs],
                dtype=torch.float32,
            ),
        )


def _ranges(counts: torch.Tensor) -> torch.Tensor:
    """[2, 3] -> [0, 1, 0, 1, 2]."""
    total = int(counts.sum())
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total) - torch.repeat_interleave(starts, counts)


def _slots(counts: torch.Tensor) -> torch.Tensor:
    """(B,) counts -> (B, max count) flat index of each item, -1 for padding."""
    width = int(counts.max()) if counts.numel() else 0
    col = torch.arange(width).expand(len(counts), width)
    starts = (torch.cumsum(counts, 0) - counts).unsqueeze(1)
    return torch.where(col < counts.unsqueeze(1), starts + col, torch.full_like(col, -1))


def _scatter_padded(
    flat: torch.Tensor, cells: torch.Tensor, shape: torch.Size, fill: float | bool
) -> torch.Tensor:
    out = torch.full((shape[0] * shape[1],), fill, dtype=flat.dtype, device=flat.device)
    out[cells] = flat
    return out.view(shape)


@dataclass
class TokenLayout:
    """Model input rows and where each action token and value read sits in them.

    Shapes: ``input_ids, attention_mask, position_ids (R, L)``; ``action_rows, action_cols (N,)``;
    ``value_rows, value_cols (S,)``; ``bootstrap_rows, bootstrap_cols (B,)`` (-1 = no bootstrap).
    """

    kind: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    action_rows: torch.Tensor
    action_cols: torch.Tensor
    value_rows: torch.Tensor
    value_cols: torch.Tensor
    bootstrap_rows: torch.Tensor
    bootstrap_cols: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_input_tokens(self) -> int:
        """Real (non-pad) tokens the model reads: the cost of a forward pass."""
        return int(self.attention_mask.sum())

    @property
    def action_mask(self) -> torch.Tensor:
        """(R, L) bool: positions holding an action token."""
        mask = torch.zeros_like(self.attention_mask)
        mask[self.action_rows, self.action_cols] = True
        return mask

    def gather_actions(self, per_position: torch.Tensor, shift: bool = True) -> torch.Tensor:
        """(R, L, ...) -> (N, ...): model outputs for each action token, canonical order.

        With ``shift`` (the default) the output at ``col - 1`` is taken: the prediction of the
        token, or the value of the state right before it.
        """
        cols = self.action_cols - 1 if shift else self.action_cols
        return per_position[self.action_rows, cols]

    def gather_values(self, per_position: torch.Tensor) -> torch.Tensor:
        """(R, L) -> (S,): the state value V_t of each step."""
        return per_position[self.value_rows, self.value_cols]

    def gather_bootstrap(self, per_position: torch.Tensor) -> torch.Tensor:
        """(R, L) -> (B,): V(next state) for truncated trajectories, 0 elsewhere."""
        has = self.bootstrap_rows >= 0
        out = torch.zeros(len(has), dtype=per_position.dtype, device=per_position.device)
        out[has] = per_position[self.bootstrap_rows[has], self.bootstrap_cols[has]]
        return out

    def to(self, device: torch.device | str) -> "TokenLayout":
        return TokenLayout(
            kind=self.kind,
            **{
                name: getattr(self, name).to(device)
                for name in self.__dataclass_fields__
                if name != "kind"
            },
        )


@dataclass
class _RowPlan:
    """Rows as token lists plus, per step/trajectory, where the reads sit."""

    rows: list[list[int]]
    action_pos: list[tuple[int, int, int]]  # (row, first col, length) per step, canonical order
    bootstrap_pos: list[tuple[int, int]]  # (row, col) per trajectory, (-1, -1) = none


def _plan_per_step(trajectories: Sequence[Trajectory]) -> _RowPlan:
    plan = _RowPlan(rows=[], action_pos=[], bootstrap_pos=[])
    for traj in trajectories:
        for step in traj.steps:
            plan.action_pos.append((len(plan.rows), len(step.prompt_ids), len(step.response_ids)))
            plan.rows.append(step.context_ids)
        plan.bootstrap_pos.append(_bootstrap_per_step(traj, plan.rows))
    return plan


def _bootstrap_per_step(traj: Trajectory, rows: list[list[int]]) -> tuple[int, int]:
    if traj.terminated:
        return (-1, -1)
    if traj.bootstrap_ids is None:
        return (len(rows) - 1, len(rows[-1]) - 1)
    rows.append(list(traj.bootstrap_ids))
    return (len(rows) - 1, len(traj.bootstrap_ids) - 1)


def _extends(context: list[int], ids: Sequence[int]) -> bool:
    return len(ids) >= len(context) and list(ids[: len(context)]) == context


def _plan_prefix_shared(trajectories: Sequence[Trajectory]) -> _RowPlan:
    plan = _RowPlan(rows=[], action_pos=[], bootstrap_pos=[])
    for traj in trajectories:
        row: list[int] | None = None
        for step in traj.steps:
            prompt = step.prompt_ids
            if row is not None and _extends(row, prompt):
                row.extend(prompt[len(row) :])
            else:
                row = list(prompt)
                plan.rows.append(row)
            plan.action_pos.append((len(plan.rows) - 1, len(row), len(step.response_ids)))
            row.extend(step.response_ids)
        if traj.terminated:
            plan.bootstrap_pos.append((-1, -1))
        elif traj.bootstrap_ids is None:
            plan.bootstrap_pos.append((len(plan.rows) - 1, len(row) - 1))
        else:
            nxt = traj.bootstrap_ids
            if _extends(row, nxt):
                row.extend(nxt[len(row) :])
            else:
                plan.rows.append(list(nxt))
            plan.bootstrap_pos.append((len(plan.rows) - 1, len(plan.rows[-1]) - 1))
    return plan


def input_tokens(trajectory: Trajectory, kind: str) -> int:
    """Model-input tokens one trajectory costs in a layout (the sum of its row lengths)."""
    plan = _plan_per_step([trajectory]) if kind == "per_step" else _plan_prefix_shared([trajectory])
    return sum(len(r) for r in plan.rows)


def build_layout(
    trajectories: Sequence[Trajectory], kind: str = "prefix_shared", pad_id: int = 0
) -> TokenLayout:
    """Lay the trajectories' tokens out in model input rows (right-padded), see module doc."""
    if kind == "per_step":
        plan = _plan_per_step(trajectories)
    elif kind == "prefix_shared":
        plan = _plan_prefix_shared(trajectories)
    else:
        raise ValueError(f"unknown layout {kind!r}; choose one of {LAYOUTS}")
    R = len(plan.rows)
    L = max((len(r) for r in plan.rows), default=0)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((R, L), dtype=torch.bool)
    for r, row in enumerate(plan.rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, : len(row)] = True
    pos = torch.tensor(plan.action_pos, dtype=torch.long).reshape(-1, 3)
    rows, starts, lengths = pos[:, 0], pos[:, 1], pos[:, 2]
    boot = torch.tensor(plan.bootstrap_pos, dtype=torch.long).reshape(-1, 2)
    return TokenLayout(
        kind=kind,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=torch.arange(L).expand(R, L).clone(),
        action_rows=torch.repeat_interleave(rows, lengths),
        action_cols=torch.repeat_interleave(starts, lengths) + _ranges(lengths),
        value_rows=rows,
        value_cols=starts - 1,
        bootstrap_rows=boot[:, 0],
        bootstrap_cols=boot[:, 1],
    )
