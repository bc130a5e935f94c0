"""From trajectories to training tensors: a per-step view and four token layouts.

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
  input rows. Four layouts exist; all give the same per-step numbers.

Per-step layout, one row per step (the reference layout)::

    row 0: [ p0 p0 p0 | a0 a0 ]              step 0: prompt p0, response a0
    row 1: [ p0 p0 p0 a0 a0 o0 o0 | a1 a1 a1 ]   step 1: prompt = p0 a0 o0 (cumulative)
    row 2: [ q0 q0 | b0 ]                    step 0 of another trajectory
                 ^ value read here (last prompt token) for each row's step

Prefix-shared layout, one row per *chain* (consecutive steps whose prompt extends the previous
step's prompt + response exactly)::

    row 0: [ p0 p0 p0 a0 a0 o0 o0 a1 a1 a1 ]
                   ^  [span0]    ^ [span1 ]      value of step t read just before its span
    row 1: [ q0 q0 b0 ]

Packed layout: the same chains, several to a row up to ``row_tokens``, position ids restarting
at 0 for each chain and attention kept inside a chain (block-diagonal causal, which Hugging Face
models derive from the position-id resets), so rows carry almost no padding::

    row 0: [ p0 p0 p0 a0 a0 o0 o0 a1 a1 a1 | q0 q0 b0 ]      positions 0..9 | 0..2

Tree layout: packed chains, and the trajectories of one task group share their common first
prompt (the task statement) as one root; each trajectory continues as a branch that attends to
the root and to itself only (an explicit attention mask, ``tree_mask``), with positions
continuing from the root::

    row 0: [ r r r r | x0 a0 a0 o0 a1 | y0 y0 b0 ]   branches x and y both read root r r r r

Action tokens are at ``(action_rows, action_cols)``; the log-prob of an action token and the
token-level value of its state come from the model's output at ``(action_rows,
action_pred_cols)``: the column before it in its chain (in the tree layout, the root's last
token for a branch's first token). The step value V_t is read at ``(value_rows, value_cols)``,
the position just before the step's first action token. A truncated trajectory's bootstrap
state V(s_{T+1}) is read at ``(bootstrap_rows, bootstrap_cols)`` (``-1`` for trajectories that
need none). A causal model sees the same tokens at the same positions before every read in every
layout, so it gives the same numbers; the shared layouts read each shared token once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from steppo.core.choices import DEFAULT_ROW_TOKENS, LAYOUTS  # noqa: F401 (importable from here)
from steppo.core.records import Trajectory


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
    def steps_per_trajectory(self) -> torch.Tensor:
        """(B,) number of steps of each trajectory."""
        return self.step_mask.sum(1)

    @cached_property
    def tokens_per_trajectory(self) -> torch.Tensor:
        """(B,) number of action tokens of each trajectory."""
        return self.token_mask.sum(1)

    @cached_property
    def step_start(self) -> torch.Tensor:
        """(B,) flat index of each trajectory's first step."""
        return torch.cumsum(self.steps_per_trajectory, 0) - self.steps_per_trajectory

    @cached_property
    def token_start(self) -> torch.Tensor:
        """(B,) flat index of each trajectory's first action token."""
        return torch.cumsum(self.tokens_per_trajectory, 0) - self.tokens_per_trajectory

    @cached_property
    def first_token(self) -> torch.Tensor:
        """(S,) flat index of each step's first action token."""
        return torch.cumsum(self.response_lengths, 0) - self.response_lengths

    @cached_property
    def _token_cells(self) -> torch.Tensor:
        """(N,) index of each action token in the flattened (B, K) grid."""
        rank = torch.arange(self.num_tokens, device=self.token_traj.device)
        return self.token_traj * self.token_slots.shape[1] + rank - self.token_start[self.token_traj]

    @cached_property
    def step_end(self) -> torch.Tensor:
        """(B, K) bool: the token is the last one of its step."""
        flat_end = torch.zeros(self.num_tokens, dtype=torch.bool, device=self.response_lengths.device)
        if self.num_tokens:
            flat_end[self.first_token + self.response_lengths - 1] = True
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
        return self.step_start + self.steps_per_trajectory - 1

    def to(self, device: torch.device | str) -> StepBatch:
        """The same batch with every tensor on `device` (the maps work on any device)."""
        return StepBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    def flat_ranges(self, idx: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S',), (N',) flat indices of the steps and of the action tokens of trajectories `idx`,
        trajectory after trajectory in the order of `idx` (sizes depend on the data: host side)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.step_slots.device)
        return (
            self._runs(self.step_start[idx], self.steps_per_trajectory[idx]),
            self._runs(self.token_start[idx], self.tokens_per_trajectory[idx]),
        )

    def select(self, idx: Sequence[int] | torch.Tensor) -> StepBatch:
        """The sub-batch of trajectories `idx`, in that order, as `from_trajectories` collates them:
        per-step, per-token and per-trajectory fields are this batch's, sliced (one index of its
        flat steps and tokens); flat indices and group and anchor ids are renumbered densely in
        order of first appearance. Sizes depend on the data: call it on the host side."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.step_slots.device)
        steps, tokens = self.flat_ranges(idx)
        steps_per, lengths = self.steps_per_trajectory[idx], self.response_lengths[steps]
        step_traj = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), steps_per)
        token_step = torch.repeat_interleave(torch.arange(len(steps), device=idx.device), lengths)
        return StepBatch(
            step_slots=_slots(steps_per.cpu()).to(idx.device),
            token_slots=_slots(self.tokens_per_trajectory[idx].cpu()).to(idx.device),
            step_traj=step_traj,
            step_index=self.step_index[steps],
            rewards=self.rewards[steps],
            response_lengths=lengths,
            anchor=self._dense_ids(self.anchor[steps]),
            policy_version=self.policy_version[steps],
            terminated=self.terminated[idx],
            truncated=self.truncated[idx],
            group=self._dense_ids(self.group[idx]),
            token_step=token_step,
            token_traj=step_traj[token_step],
            old_logprobs=self.old_logprobs[tokens],
        )

    @staticmethod
    def _runs(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Concatenated ranges [start, start + count): starts [5, 0], counts [2, 1] -> [5, 6, 0]."""
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(int(counts.sum()), device=counts.device)
        return pos + torch.repeat_interleave(starts - offsets, counts)

    @staticmethod
    def _dense_ids(ids: torch.Tensor) -> torch.Tensor:
        """Ids renumbered 0, 1, ... in order of first appearance; -1 (none) stays -1."""
        table: dict[int, int] = {}
        dense = [-1 if i < 0 else table.setdefault(i, len(table)) for i in ids.tolist()]
        return torch.tensor(dense, dtype=ids.dtype, device=ids.device)

    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Trajectory]) -> StepBatch:
        """Collate records (Python lists) into CPU tensors; move the batch with `to`."""
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

    Shapes: ``input_ids, position_ids (R, L)``; ``attention_mask (R, L)`` (real tokens);
    ``action_rows, action_cols, action_pred_cols (N,)``; ``value_rows, value_cols (S,)``;
    ``bootstrap_rows, bootstrap_cols (B,)`` (-1 = no bootstrap); ``tree_mask (R, L, L)`` or
    None: which positions each position attends to (tree layout only; the other layouts are
    plain causal, the packed one restarting at every position-id reset).
    """

    kind: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    action_rows: torch.Tensor
    action_cols: torch.Tensor
    action_pred_cols: torch.Tensor
    value_rows: torch.Tensor
    value_cols: torch.Tensor
    bootstrap_rows: torch.Tensor
    bootstrap_cols: torch.Tensor
    tree_mask: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_input_tokens(self) -> int:
        """Real (non-pad) tokens the model reads: the cost of a forward pass."""
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        """Tokens the model computes, padding included (rows x length)."""
        return self.input_ids.numel()

    @property
    def action_mask(self) -> torch.Tensor:
        """(R, L) bool: positions holding an action token."""
        mask = torch.zeros_like(self.attention_mask)
        mask[self.action_rows, self.action_cols] = True
        return mask

    def gather_actions(self, per_position: torch.Tensor, shift: bool = True) -> torch.Tensor:
        """(R, L, ...) -> (N, ...): model outputs for each action token, canonical order.

        With ``shift`` (the default) the output at the token's predecessor is taken: the
        prediction of the token, or the value of the state right before it.
        """
        cols = self.action_pred_cols if shift else self.action_cols
        return per_position[self.action_rows, cols]

    def gather_values(self, per_position: torch.Tensor) -> torch.Tensor:
        """(R, L) -> (S,): the state value V_t of each step."""
        return per_position[self.value_rows, self.value_cols]

    def gather_bootstrap(self, per_position: torch.Tensor) -> torch.Tensor:
        """(R, L) -> (B,): V(next state) for truncated trajectories, 0 elsewhere."""
        has = self.bootstrap_rows >= 0
        # Read (0, 0) where there is no bootstrap and zero it: no data-dependent indexing.
        read = per_position[self.bootstrap_rows.clamp(min=0), self.bootstrap_cols.clamp(min=0)]
        return torch.where(has, read, 0)

    def to(self, device: torch.device | str) -> TokenLayout:
        moved = {
            name: getattr(self, name).to(device)
            for name in self.__dataclass_fields__
            if name != "kind" and getattr(self, name) is not None
        }
        return TokenLayout(kind=self.kind, **{**{"tree_mask": None}, **moved})


# ----------------------------------------------------------------------------- planning


@dataclass
class _Chain:
    """Consecutive steps of one trajectory whose prompts extend each other, as one token run.

    ``steps``: (flat step index, offset of the first action token, action length).
    ``bootstrap``: offset of the bootstrap read (the trajectory's, if it lands in this chain).
    """

    traj: int
    tokens: list[int]
    steps: list[tuple[int, int, int]]
    bootstrap: int | None = None


def _extends(context: list[int], ids: Sequence[int]) -> bool:
    return len(ids) >= len(context) and list(ids[: len(context)]) == context


def _chains(trajectories: Sequence[Trajectory], one_step_per_chain: bool) -> list[_Chain]:
    chains: list[_Chain] = []
    flat = 0
    for b, traj in enumerate(trajectories):
        current: _Chain | None = None
        for step in traj.steps:
            prompt = step.prompt_ids
            if current is not None and not one_step_per_chain and _extends(current.tokens, prompt):
                current.tokens.extend(prompt[len(current.tokens):])
            else:
                current = _Chain(b, list(prompt), [])
                chains.append(current)
            current.steps.append((flat, len(current.tokens), len(step.response_ids)))
            current.tokens.extend(step.response_ids)
            flat += 1
        if traj.terminated:
            continue
        nxt = traj.bootstrap_ids
        if nxt is None:
            current.bootstrap = len(current.tokens) - 1
        elif not one_step_per_chain and _extends(current.tokens, nxt):
            current.tokens.extend(nxt[len(current.tokens):])
            current.bootstrap = len(current.tokens) - 1
        else:
            chains.append(_Chain(b, list(nxt), [], bootstrap=len(nxt) - 1))
    return chains


@dataclass
class _Unit:
    """Tokens that attend to each other: a root and zero or more branches hanging off it."""

    root: list[int]
    branches: list[_Chain]  # a branch's own tokens are chain.tokens[len(root):]
    chain: _Chain | None = None  # a plain chain (no branches) when set

    def __len__(self) -> int:
        if self.chain is not None:
            return len(self.chain.tokens)
        return len(self.root) + sum(len(c.tokens) - len(self.root) for c in self.branches)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs[1:]):
            return i
    return n


def _tree_units(trajectories: Sequence[Trajectory], chains: list[_Chain]) -> list[_Unit]:
    """Group each trajectory's first chain with the other first chains of its task group under
    their common prompt prefix (never past any member's first action token)."""
    first_chain: dict[int, _Chain] = {}
    for c in chains:
        first_chain.setdefault(c.traj, c)
    groups: dict[str, list[_Chain]] = {}
    for b, c in first_chain.items():
        if c.steps:
            groups.setdefault(trajectories[b].group_id, []).append(c)
    units: list[_Unit] = []
    rooted: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        limit = min(c.steps[0][1] for c in members)  # up to the first action token
        shared = min(_common_prefix([c.tokens for c in members]), limit)
        if shared < 1:
            continue
        units.append(_Unit(root=members[0].tokens[:shared], branches=members))
        rooted.update(id(c) for c in members)
    units += [_Unit(root=[], branches=[], chain=c) for c in chains if id(c) not in rooted]
    return units


@dataclass
class _Placed:
    """Where the planner put things: flat lists filled unit by unit."""

    rows: list[list[int]]
    positions: list[list[int]]
    segments: list[list[int]]  # per token: segment id within its row (tree masks)
    parents: list[dict[int, int]]  # per row: segment -> parent segment (-1 = none)
    action: dict[int, tuple[int, int, int, int]]  # flat step -> (row, col, length, pred col)
    bootstrap: dict[int, tuple[int, int]]  # trajectory -> (row, col)


def _place(units: list[_Unit], row_tokens: int | None) -> _Placed:
    """Lay units out in rows: one unit per row when `row_tokens` is None, else first-fit up to
    `row_tokens` tokens a row (a longer unit gets a row of its own)."""
    out = _Placed([], [], [], [], {}, {})
    for unit in units:
        n = len(unit)
        if row_tokens is None or not out.rows or len(out.rows[-1]) + n > row_tokens:
            out.rows.append([])
            out.positions.append([])
            out.segments.append([])
            out.parents.append({})
        r = len(out.rows) - 1
        row, pos, seg, parents = out.rows[r], out.positions[r], out.segments[r], out.parents[r]
        if unit.chain is not None:
            sid = len(parents)
            parents[sid] = -1
            base = len(row)
            row.extend(unit.chain.tokens)
            pos.extend(range(len(unit.chain.tokens)))
            seg.extend([sid] * len(unit.chain.tokens))
            _record(out, unit.chain, r, lambda off, base=base: base + off)
            continue
        root_sid = len(parents)
        parents[root_sid] = -1
        root_start = len(row)
        k = len(unit.root)
        row.extend(unit.root)
        pos.extend(range(k))
        seg.extend([root_sid] * k)
        for chain in unit.branches:
            sid = len(parents)
            parents[sid] = root_sid
            start = len(row)
            own = chain.tokens[k:]
            row.extend(own)
            pos.extend(range(k, k + len(own)))
            seg.extend([sid] * len(own))

            def col(off, start=start, root_start=root_start, k=k):
                return root_start + off if off < k else start + off - k

            _record(out, chain, r, col)
    return out


def _record(out: _Placed, chain: _Chain, r: int, col) -> None:
    """Store action, value and bootstrap positions of `chain` (offsets mapped by `col`)."""
    for flat, off, length in chain.steps:
        out.action[flat] = (r, col(off), length, col(off - 1))
    if chain.bootstrap is not None:
        out.bootstrap[chain.traj] = (r, col(chain.bootstrap))


def _plan(trajectories: Sequence[Trajectory], kind: str, row_tokens: int | None) -> _Placed:
    if kind not in LAYOUTS:
        raise ValueError(f"unknown layout {kind!r}; choose one of {LAYOUTS}")
    chains = _chains(trajectories, one_step_per_chain=kind == "per_step")
    if kind == "tree":
        units = _tree_units(trajectories, chains)
    else:
        units = [_Unit(root=[], branches=[], chain=c) for c in chains]
    budget = (row_tokens or DEFAULT_ROW_TOKENS) if kind in ("packed", "tree") else None
    return _place(units, budget)


def input_tokens(trajectories: Sequence[Trajectory], kind: str) -> int:
    """Model-input tokens (padding excluded) the trajectories cost together in a layout."""
    if kind not in LAYOUTS:
        raise ValueError(f"unknown layout {kind!r}; choose one of {LAYOUTS}")
    chains = _chains(trajectories, one_step_per_chain=kind == "per_step")
    if kind == "tree":
        return sum(len(u) for u in _tree_units(trajectories, chains))
    return sum(len(c.tokens) for c in chains)


def build_layout(
    trajectories: Sequence[Trajectory],
    kind: str = "prefix_shared",
    pad_id: int = 0,
    row_tokens: int | None = None,
) -> TokenLayout:
    """Lay the trajectories' tokens out in model input rows (right-padded), see module doc.

    Args:
        kind: per_step | prefix_shared | packed | tree.
        row_tokens: most tokens in a packed/tree row (default DEFAULT_ROW_TOKENS).
    """
    placed = _plan(trajectories, kind, row_tokens)
    R = len(placed.rows)
    L = max((len(r) for r in placed.rows), default=0)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((R, L), dtype=torch.bool)
    position_ids = torch.arange(L).expand(R, L).clone()
    for r, (row, pos) in enumerate(zip(placed.rows, placed.positions)):
        n = len(row)
        input_ids[r, :n] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, :n] = True
        position_ids[r, :n] = torch.tensor(pos, dtype=torch.long)
        if kind in ("packed", "tree"):
            position_ids[r, n:] = torch.arange(L - n)  # padding: a sequence of its own
    S = len(placed.action)
    act = torch.tensor([placed.action[i] for i in range(S)], dtype=torch.long).reshape(-1, 4)
    rows, starts, lengths, preds = act[:, 0], act[:, 1], act[:, 2], act[:, 3]
    ranks = _ranges(lengths)
    first = ranks == 0
    action_cols = torch.repeat_interleave(starts, lengths) + ranks
    action_pred = torch.where(first, torch.repeat_interleave(preds, lengths), action_cols - 1)
    boot = torch.full((len(trajectories), 2), -1, dtype=torch.long)
    for b, (r, c) in placed.bootstrap.items():
        boot[b] = torch.tensor([r, c])
    return TokenLayout(
        kind=kind,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        action_rows=torch.repeat_interleave(rows, lengths),
        action_cols=action_cols,
        action_pred_cols=action_pred,
        value_rows=rows,
        value_cols=preds,
        bootstrap_rows=boot[:, 0],
        bootstrap_cols=boot[:, 1],
        tree_mask=_tree_mask(placed, L) if kind == "tree" else None,
    )


def _tree_mask(placed: _Placed, L: int) -> torch.Tensor:
    """(R, L, L) bool: position i attends to j <= i whose segment is i's or an ancestor of it
    (padding attends to itself only, so no row of the mask is empty)."""
    R = len(placed.rows)
    mask = torch.zeros((R, L, L), dtype=torch.bool)
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    for r, (segs, parents) in enumerate(zip(placed.segments, placed.parents)):
        n = len(segs)
        S = len(parents)
        visible = torch.eye(S, dtype=torch.bool)  # visible[a, b]: segment a sees segment b
        for a in range(S):
            p = parents[a]
            while p != -1:
                visible[a, p] = True
                p = parents[p]
        seg = torch.tensor(segs, dtype=torch.long)
        mask[r, :n, :n] = visible[seg][:, seg] & causal[:n, :n]
        idx = torch.arange(n, L)
        mask[r, idx, idx] = True
    return mask
