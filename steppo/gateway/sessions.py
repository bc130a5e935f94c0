"""Sessions: every LLM call of an agent's episode becomes one step, with exact tokens.

A session is one episode, named by the agent's base URL (``/sessions/{id}/v1``). Each chat
completion in it is a step: the prompt ids the policy saw, the ids it sampled and their
log-probs, and the policy version. When the agent sends back the history it was given (its
earlier messages, the assistant messages the gateway returned, then new tool results or a user
message), the prompt is *not* re-rendered: it is the exact ids of the earlier step (prompt +
sampled response) followed by the template's delta for the new messages
(`ChatFormat.continuation_ids`), so consecutive steps extend each other and the prefix-shared
layout applies. Messages are matched by content (role, text, tool calls with their arguments
as JSON values), never by re-encoding. An agent that edits, drops or summarises its history
starts a new chain: its messages are rendered whole, and the earlier assistant turns it holds
are counted as ``retokenized_turns``, so drift is visible, never silent.

Rewards (`reward`) go to the last step or to a given step; `end` finishes the session as
``terminated`` or ``truncated`` and appends its trajectory to the data pool; a session idle for
longer than ``timeout_s`` is ended as ``truncated`` with ``end_reason = "timeout"`` (counted;
in the pool, so not lost, and not marked as finished). With ``n > 1`` the choices of one call are
siblings: the trajectory keeps the one the agent continued (or the first).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from steppo.core.records import Step, Trajectory
from steppo.models.chat import call_arguments, message_text


class SessionError(ValueError):
    """A request that does not fit its session (unknown, ended, bad reward); the server answers 400/404."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def message_key(message: dict) -> str:
    """A message's identity for matching: role, text, and tool calls (name + arguments as JSON
    values, ids ignored); ``None`` and empty content are the same."""
    calls = [[(c.get("function") or {}).get("name"), call_arguments(c.get("function") or {})]
             for c in message.get("tool_calls") or []]
    return json.dumps([message.get("role"), message_text(message.get("content")), calls], sort_keys=True,
                      ensure_ascii=False)


def _chain(seed: str, keys: list[str]) -> list[str]:
    """Rolling digests: out[i] identifies (seed, keys[:i])."""
    out = [hashlib.sha256(seed.encode()).hexdigest()]
    for k in keys:
        out.append(hashlib.sha256((out[-1] + k).encode()).hexdigest())
    return out


@dataclass
class Prepared:
    """The prompt of one call: its ids, the step it extends (None: a new chain) and how it was built."""

    prompt_ids: list[int]
    parent: int | None
    retokenized_turns: int
    digests: list[str]


@dataclass
class _Known:
    ids: list[int]  # prompt + sampled response of a step
    closed: bool  # the response ended with a stop token
    step: int


@dataclass
class Session:
    id: str
    created: float
    last_active: float
    steps: list[Step] = field(default_factory=list)
    known: dict[str, _Known] = field(default_factory=dict)  # digest of messages + reply -> ids
    final_reward: float = 0.0
    step_rewards: dict[int, float] = field(default_factory=dict)
    inflight: int = 0
    calls: int = 0


class SessionStore:
    """All live sessions of a gateway (thread-safe). Finished trajectories go to `sink`.

    Args:
        chat: the model's `steppo.models.chat.ChatFormat`.
        sink: called with each finished `Trajectory` (the data pool's ``append``).
        policy_version: the version of the weights now serving (recorded in every step).
        timeout_s: a session idle this long is ended as timed out.
    """

    def __init__(self, chat, sink: Callable[[Trajectory], None], policy_version: Callable[[], int] = lambda: 0,
                 timeout_s: float = 600.0, max_sessions: int = 10_000, max_inflight_per_session: int = 4):
        self.chat = chat
        self.sink = sink
        self.policy_version = policy_version
        self.timeout_s = timeout_s
        self.max_sessions = max_sessions
        self.max_inflight = max_inflight_per_session
        self._sessions: dict[str, Session] = {}
        self._ended: set[str] = set()
        self._lock = threading.RLock()
        self.counts: Counter = Counter()

    # ------------------------------------------------------------------ one call

    def begin(self, session_id: str, messages: list[dict], tools: list[dict] | None) -> Prepared:
        """The prompt ids of a call in `session_id` (created on first use)."""
        with self._lock:
            if session_id in self._ended:
                raise SessionError(f"session {session_id!r} has ended; start a new session id", 409)
            s = self._sessions.get(session_id)
            if s is None:
                if len(self._sessions) >= self.max_sessions:
                    raise SessionError(f"too many open sessions ({self.max_sessions}); end some first", 429)
                s = self._sessions[session_id] = Session(session_id, time.monotonic(), time.monotonic())
            if s.inflight >= self.max_inflight:
                raise SessionError(f"session {session_id!r} already has {s.inflight} calls in flight", 429)
            s.inflight += 1
            s.last_active = time.monotonic()
            known = dict(s.known)
        try:
            return self._prepare(known, messages, tools)
        except BaseException:
            with self._lock:
                s.inflight -= 1
            raise

    def _prepare(self, known: dict[str, _Known], messages: list[dict], tools: list[dict] | None) -> Prepared:
        keys = [message_key(m) for m in messages]
        digests = _chain(json.dumps(tools or [], sort_keys=True), keys)
        for i in range(len(messages), 0, -1):  # the longest known history this call extends
            if messages[i - 1].get("role") != "assistant" or digests[i] not in known:
                continue
            rest = messages[i:]
            if rest and all(m.get("role") in ("user", "tool") for m in rest):
                k = known[digests[i]]
                ids = k.ids + self.chat.continuation_ids(rest, k.closed, tools)
                self.counts["prefix_extended"] += 1
                return Prepared(ids, k.step, 0, digests)
            break
        assistant_turns = sum(m.get("role") == "assistant" for m in messages)
        self.counts["retokenized_turns"] += assistant_turns
        self.counts["retokenized_calls"] += bool(assistant_turns)
        self.counts["new_chains"] += 1
        return Prepared(self.chat.conversation_ids(messages, tools), None, assistant_turns, digests)

    def record(self, session_id: str, prepared: Prepared, replies: list[tuple[Any, dict]],
               info: dict[str, Any] | None = None) -> list[int]:
        """Record the call's choices (`replies`: (Sample, the assistant message returned)) as
        steps; returns their step indices."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:  # ended (or timed out) while generating: nothing to add to
                self.counts["late_replies"] += 1
                return []
            s.inflight -= 1
            s.last_active = time.monotonic()
            call, s.calls = s.calls, s.calls + 1
            version = self.policy_version()
            out = []
            for choice, (sample, message) in enumerate(replies):
                idx = len(s.steps)
                s.steps.append(Step(
                    prompt_ids=list(prepared.prompt_ids), response_ids=list(sample.response_ids),
                    logprobs=list(sample.logprobs), response_truncated=sample.cut, policy_version=version,
                    info={"call": call, "choice": choice, "parent": prepared.parent,
                          "retokenized_turns": prepared.retokenized_turns, **(info or {})},
                ))
                closed = bool(sample.response_ids) and not sample.cut and sample.response_ids[-1] in self.chat.stop_ids
                digest = hashlib.sha256((prepared.digests[-1] + message_key(message)).encode()).hexdigest()
                s.known[digest] = _Known(list(prepared.prompt_ids) + list(sample.response_ids), closed, idx)
                out.append(idx)
            self.counts["steps"] += len(replies)
            return out

    def abandon(self, session_id: str) -> None:
        """A call that failed after `begin` (generation error, client gone)."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None:
                s.inflight -= 1

    # ------------------------------------------------------------------ rewards and ends

    def reward(self, session_id: str, reward: float, step: int | None = None) -> None:
        """Add `reward` to the session's last step (when it ends), or to step `step` (its
        0-based call number)."""
        if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
            raise SessionError(f"reward must be a finite number, got {reward!r}")
        with self._lock:
            s = self._live(session_id)
            if step is None:
                s.final_reward += float(reward)
            else:
                if not 0 <= step < s.calls:
                    raise SessionError(f"session {session_id!r} has {s.calls} steps so far; no step {step}")
                s.step_rewards[step] = s.step_rewards.get(step, 0.0) + float(reward)
            s.last_active = time.monotonic()

    def end(self, session_id: str, status: str = "terminated", success: bool | None = None,
            reason: str | None = None) -> Trajectory | None:
        """Finish the session; its trajectory (None when it made no call) goes to the sink."""
        if status not in ("terminated", "truncated"):
            raise SessionError(f"status must be 'terminated' or 'truncated', got {status!r}")
        with self._lock:
            s = self._live(session_id)
            del self._sessions[session_id]
            self._ended.add(session_id)
        traj = self._trajectory(s, status, success, reason or status)
        if traj is None:
            self.counts["empty_sessions"] += 1
            return None
        self.sink(traj)
        self.counts["trajectories"] += 1
        self.counts[f"ended_{reason or status}"] += 1
        return traj

    def expire(self, now: float | None = None) -> list[str]:
        """End every session idle for longer than ``timeout_s`` (as truncated, reason timeout)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if s.inflight == 0 and now - s.last_active > self.timeout_s]
        for sid in stale:
            try:
                self.end(sid, "truncated", reason="timeout")
                self.counts["timed_out"] += 1
            except SessionError:
                pass  # ended by its agent meanwhile
        return stale

    def _live(self, session_id: str) -> Session:
        s = self._sessions.get(session_id)
        if s is None:
            state = "has ended" if session_id in self._ended else "does not exist (it starts with its first call)"
            raise SessionError(f"session {session_id!r} {state}", 409 if session_id in self._ended else 404)
        return s

    def _trajectory(self, s: Session, status: str, success: bool | None, reason: str) -> Trajectory | None:
        """The steps the agent took: every call in order, one choice per call (the one a later
        call continued, else the first)."""
        continued = {st.info["parent"] for st in s.steps if st.info["parent"] is not None}
        chosen: dict[int, int] = {}
        for i, st in enumerate(s.steps):
            call = st.info["call"]
            if call not in chosen or (i in continued and chosen[call] not in continued):
                chosen[call] = i
        kept = [s.steps[i] for _, i in sorted(chosen.items())]
        self.counts["dropped_choices"] += len(s.steps) - len(kept)
        if not kept:
            return None
        for i, st in enumerate(kept):
            st.reward = s.step_rewards.get(i, 0.0)
        kept[-1].reward += s.final_reward
        kept[-1].terminated = status == "terminated"
        kept[-1].truncated = status == "truncated"
        return Trajectory(steps=kept, id=f"session/{s.id}", group_id=s.id, task_id=s.id, success=success,
                          end_reason=reason, info={"calls": s.calls, "wall_s": time.monotonic() - s.created})

    def live(self) -> int:
        """Sessions open now (begun, not ended or expired)."""
        with self._lock:
            return len(self._sessions)

    def metrics(self) -> dict[str, float]:
        """``gateway/...`` counters; ``prefix_extended_frac``: calls after the first of a chain
        that extended a known history exactly."""
        c = self.counts
        later = c["prefix_extended"] + c["retokenized_calls"]
        out = {f"gateway/{k}": float(v) for k, v in c.items()}
        out["gateway/live_sessions"] = float(self.live())
        out["gateway/prefix_extended_frac"] = c["prefix_extended"] / later if later else 1.0
        return out
