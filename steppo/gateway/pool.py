"""The data pool: finished trajectories on disk, append-only and crash-safe.

One file, ``<pool>/trajectories.jsonl``: one JSON object per finished trajectory (a gateway
session), written with a single ``write`` of the whole line, then flushed and fsynced, so a
crash leaves at most one torn *last* line. Readers take complete lines only: a torn tail is not
read (it is completed or overwritten by the next append after a restart: `DataPool` truncates a
torn tail before appending), and a line that is not valid JSON is skipped and counted, never
trained on. A consumer keeps its byte offset (the trainer stores it in its checkpoint), so a
restarted trainer reads every trajectory once: none lost, none counted twice.

Record schema (``format: 1``)::

    {"format": 1, "id": str, "group_id": str, "task_id": str | null, "end_reason": str,
     "success": bool | null, "info": {...},
     "steps": [{"prompt_ids": [int], "response_ids": [int], "logprobs": [float], "reward": float,
                "terminated": bool, "truncated": bool, "response_truncated": bool,
                "policy_version": int, "info": {...}}]}
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from steppo.core.records import Step, Trajectory

FORMAT = 1
FILE = "trajectories.jsonl"


def trajectory_record(traj: Trajectory) -> dict:
    """`traj` as a pool record (see module doc)."""
    return {
        "format": FORMAT, "id": traj.id, "group_id": traj.group_id, "task_id": traj.task_id,
        "end_reason": traj.end_reason, "success": traj.success, "info": traj.info,
        "steps": [{"prompt_ids": s.prompt_ids, "response_ids": s.response_ids, "logprobs": s.logprobs,
                   "reward": s.reward, "terminated": s.terminated, "truncated": s.truncated,
                   "response_truncated": s.response_truncated, "policy_version": s.policy_version,
                   "info": s.info} for s in traj.steps],
    }


def record_trajectory(record: dict) -> Trajectory:
    """A pool record back as a `Trajectory`; ValueError naming what is wrong when it is not one
    (unknown format, no steps, a non-finite reward, mismatched log-probs)."""
    if record.get("format") != FORMAT:
        raise ValueError(f"pool record format {record.get('format')!r}, expected {FORMAT}")
    steps = []
    for i, s in enumerate(record.get("steps") or []):
        if not s["prompt_ids"] or not s["response_ids"] or len(s["logprobs"]) != len(s["response_ids"]):
            raise ValueError(f"step {i}: empty prompt/response or log-probs of the wrong length")
        if not math.isfinite(float(s["reward"])) or not all(math.isfinite(x) for x in s["logprobs"]):
            raise ValueError(f"step {i}: non-finite reward or log-prob")
        steps.append(Step(prompt_ids=list(s["prompt_ids"]), response_ids=list(s["response_ids"]),
                          logprobs=[float(x) for x in s["logprobs"]], reward=float(s["reward"]),
                          terminated=bool(s["terminated"]), truncated=bool(s["truncated"]),
                          response_truncated=bool(s["response_truncated"]),
                          policy_version=int(s["policy_version"]), info=dict(s.get("info") or {})))
    if not steps:
        raise ValueError("a trajectory without steps")
    return Trajectory(steps=steps, id=str(record["id"]), group_id=str(record["group_id"]),
                      task_id=record.get("task_id"), success=record.get("success"),
                      end_reason=record.get("end_reason"), info=dict(record.get("info") or {}))


class DataPool:
    """The writer side: `append` is thread-safe and durable when it returns."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / FILE
        self._lock = threading.Lock()
        self.torn_repaired = _repair_torn_tail(self.path)
        self.appended = 0

    def append(self, traj: Trajectory) -> None:
        line = (json.dumps(trajectory_record(traj), separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock, open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self.appended += 1


def _repair_torn_tail(path: Path) -> int:
    """Cut a last line that a crash left without its newline (it was never readable); returns
    the bytes cut."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        return len(data) - keep


@dataclass
class PoolRead:
    """What one `read_pool` call found."""

    trajectories: list[Trajectory] = field(default_factory=list)
    offset: int = 0  # where the next read starts
    skipped: list[str] = field(default_factory=list)  # why each bad line was not used


def read_pool(root: str | Path, offset: int = 0, limit: int | None = None) -> PoolRead:
    """Complete records after byte `offset` (at most `limit` trajectories)."""
    path = Path(root) / FILE
    out = PoolRead(offset=offset)
    if not path.exists():
        return out
    with open(path, "rb") as f:
        f.seek(offset)
        while limit is None or len(out.trajectories) < limit:
            line = f.readline()
            if not line.endswith(b"\n"):  # end of file, or a torn tail still being written
                break
            out.offset += len(line)
            try:
                out.trajectories.append(record_trajectory(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                out.skipped.append(f"byte {out.offset - len(line)}: {exc}")
    return out
