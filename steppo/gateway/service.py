"""The gateway's engine room: batching concurrent calls into one generation call, and turning a
chat-completion request into a step (`Gateway.complete`). The HTTP layer is `steppo.gateway.server`.

Sampling follows the policy, not the request: training needs the log-probs of the distribution
the trainer models, so every sampled call uses the policy's temperature (``rollout.temperature``)
and no top-p; a request asking for another temperature or a top-p is served that way and counted
(``gateway/sampling_overridden``). ``temperature: 0`` is greedy decoding (its steps are marked
``greedy`` in the pool). Tool calls in the response are parsed in the template's syntax into
OpenAI ``tool_calls``; a call that does not parse comes back as plain content and is counted.
"""

from __future__ import annotations

import json
import math
import queue
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from steppo.envs.actions import CALL_EXAMPLES, MARKERS, ToolCall, parse_tool_call
from steppo.gateway.sessions import SessionError, SessionStore
from steppo.models.chat import message_text
from steppo.models.generation import Sample


class GatewayError(ValueError):
    """A request the gateway refuses: OpenAI-shaped error with an HTTP status."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


class Batcher:
    """One thread owns the backend: calls queued together are served together, in one
    ``backend.generate`` per decoding mode (greedy / sampled), at most `max_batch` rows.

    A batch forms as calls arrive: once a call is queued the batcher waits, at most `wait_s`,
    until as many calls are queued as `expected()` says can come (the sessions now open, or the
    agents now playing), so a round of agents answering one another's tool results is served as
    one batch rather than one call at a time. Measured (`bench/gateway.py`, SmolLM2-135M, 8
    sessions): without the wait a round split into two calls of ~4 rows each.

    Generation runs on the thread that calls `serve`: with ``threaded=True`` a thread of its own;
    else the caller's (``steppo serve`` and the trainer's agent runner serve on the main thread:
    torch generated ~11% slower on a second thread here, the same weights and prompts).
    """

    def __init__(self, backend, max_batch: int = 32, wait_s: float = 0.05, expected=None, threaded: bool = True):
        self.backend = backend
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.expected = expected or (lambda: 1)
        self._queue: queue.Queue = queue.Queue()
        self.calls = 0  # backend.generate calls
        self.rows = 0
        self._keys: set[str] = set()  # keys the backend may hold a cache for
        self._closed = False
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self.serve, name="gateway-batcher", daemon=True)
            self._thread.start()

    def generate(self, prompts: list[list[int]], budgets: list[int], generators: list, greedy: bool,
                 keys: list[str]) -> Future:
        fut: Future = Future()
        if self._closed:
            fut.set_exception(RuntimeError("the gateway is shutting down"))
            return fut
        self._queue.put(("generate", (prompts, budgets, generators, greedy, keys), fut))
        return fut

    def release(self, prefix: str) -> None:
        """Drop the KV caches of keys starting with `prefix` (an ended session's)."""
        self._queue.put(("release", prefix, None))

    def close(self) -> None:
        """Stop serving; calls still queued fail (a caller-driven batcher: `serve` returns)."""
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_queued()

    def serve(self, until=None, poll_s: float = 0.02) -> None:
        """Serve queued calls on this thread until `close` (or until ``until()`` is true,
        checked every `poll_s` while idle)."""
        while True:
            try:
                item = self._queue.get(timeout=poll_s)
            except queue.Empty:
                if until is not None and until():
                    self._drain_releases()
                    return
                continue
            if item is None:
                return
            items, stop = self._gather(item)
            for kind, args, _ in items:
                if kind == "release":
                    self._release(args)
            for greedy in (False, True):
                group = [(args, fut) for kind, args, fut in items if kind == "generate" and args[3] == greedy]
                if group:
                    self._run(group, greedy)
            if stop:
                return

    def _gather(self, first) -> tuple[list, bool]:
        """`first` and the calls that join its batch; whether close was asked meanwhile."""
        items = [first]
        calls = 1 if first[0] == "generate" else 0
        rows = len(first[1][0]) if calls else 0
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            ready = calls == 0 or calls >= self.expected() or left <= 0
            try:  # ready: whatever is queued already joins; else wait for the next call
                nxt = self._queue.get_nowait() if ready else self._queue.get(timeout=left)
            except queue.Empty:
                if ready:
                    break
                continue
            if nxt is None:
                return items, True
            items.append(nxt)
            if nxt[0] == "generate":
                calls += 1
                rows += len(nxt[1][0])
        return items, False

    def _release(self, prefix: str) -> None:
        for key in [k for k in self._keys if k.startswith(prefix)]:
            self.backend.release(key)
            self._keys.discard(key)

    def _take_queued(self) -> list:
        """Everything queued now, removed from the queue."""
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _drain_releases(self) -> None:
        """Apply queued releases (the caller's serving ends; calls queued stay for the next)."""
        for item in self._take_queued():
            if item is not None and item[0] == "release":
                self._release(item[1])
            else:
                self._queue.put(item)

    def _fail_queued(self) -> None:
        for item in self._take_queued():
            if item is not None and item[0] == "generate" and item[2].set_running_or_notify_cancel():
                item[2].set_exception(RuntimeError("the gateway is shutting down"))

    def _run(self, group: list, greedy: bool) -> None:
        live = [(args, fut) for args, fut in group if fut.set_running_or_notify_cancel()]
        if not live:
            return
        prompts = [p for args, _ in live for p in args[0]]
        try:
            samples = self.backend.generate(prompts, [b for a, _ in live for b in a[1]],
                                            [g for a, _ in live for g in a[2]], greedy, [k for a, _ in live for k in a[4]])
        except BaseException as exc:  # noqa: BLE001 - every waiting call gets the failure
            for _, fut in live:
                fut.set_exception(exc)
            return
        self.calls += 1
        self.rows += len(prompts)
        self._keys.update(k for a, _ in live for k in a[4])
        at = 0
        for args, fut in live:
            fut.set_result(samples[at: at + len(args[0])])
            at += len(args[0])


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int = 512  # default and ceiling of max_tokens
    max_messages: int = 256
    max_tools: int = 64
    max_n: int = 8
    context_limit: int = 4096  # prompt + max_tokens


class Gateway:
    """Chat completions over one policy: sessions, tool calls, exact-token steps.

    Args:
        chat: the policy's `steppo.models.chat.ChatFormat`.
        batcher: the `Batcher` over the policy's generation backend.
        store: the `SessionStore` (its sink is the data pool).
        model_name: the ``model`` the gateway reports.
        temperature: the policy's sampling temperature.
    """

    def __init__(self, chat, batcher: Batcher, store: SessionStore, model_name: str, temperature: float,
                 limits: Limits | None = None, pool=None):
        """`pool`: the `DataPool` the store's sink appends to (kept for its counters and path)."""
        self.chat, self.batcher, self.store, self.pool = chat, batcher, store, pool
        self.model_name, self.temperature = model_name, temperature
        self.limits = limits or Limits()
        self.counts: Counter = Counter()
        self.created = int(time.time())
        self.force_greedy = lambda session_id: False  # evaluation: greedy whatever the agent asks

    # ------------------------------------------------------------------ a request

    def prepare(self, session_id: str | None, req: dict) -> dict:
        """Validate `req` (a parsed request body) and build its prompt; the plan `finish` completes."""
        lim = self.limits
        messages = req["messages"]
        if not messages or len(messages) > lim.max_messages:
            raise GatewayError(f"messages must hold 1 to {lim.max_messages} messages", param="messages")
        tools = req.get("tools") or None
        if tools and len(tools) > lim.max_tools:
            raise GatewayError(f"at most {lim.max_tools} tools", param="tools")
        schemas = _schemas(tools) if tools else None
        choice = req.get("tool_choice") or "auto"
        if isinstance(choice, dict):
            choice = "required"  # a named function: parsed like required (decoding is not constrained)
        n = req.get("n") or 1
        if not 1 <= n <= lim.max_n:
            raise GatewayError(f"n must be between 1 and {lim.max_n}", param="n")
        budget = req.get("max_completion_tokens") or req.get("max_tokens") or lim.max_tokens
        if budget < 1:
            raise GatewayError("max_tokens must be >= 1", param="max_tokens")
        if budget > lim.max_tokens:  # frameworks ask for thousands by default: the run's budget applies
            budget = lim.max_tokens
            self.counts["max_tokens_clamped"] += 1
        temperature = req.get("temperature")
        greedy = (temperature is not None and temperature == 0) or self.force_greedy(session_id)
        if (temperature not in (None, 0) and not math.isclose(temperature, self.temperature)) or \
                req.get("top_p") not in (None, 1, 1.0):
            self.counts["sampling_overridden"] += 1
        stop = req.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        messages = [dict(m) for m in messages]
        if tools and not self.chat.native_tools:  # the template has no tool list: describe them in the system turn
            if _lists_tools(messages, schemas):  # ... unless the agent's system prompt lists them already
                self.counts["tools_listed_by_agent"] += 1
            else:
                messages = _with_tool_prompt(messages, schemas, self.chat.tool_syntax)
        native = tools if tools and self.chat.native_tools else None
        try:
            if session_id is None:
                prepared, ids = None, self.chat.conversation_ids(messages, native)
            else:
                prepared = self.store.begin(session_id, messages, native)
                ids = prepared.prompt_ids
        except ValueError as exc:
            if isinstance(exc, SessionError):
                raise GatewayError(str(exc), exc.status) from exc
            raise GatewayError(f"the chat template cannot render these messages: {exc}", param="messages") from exc
        if len(ids) + budget > lim.context_limit:
            if prepared is not None:
                self.store.abandon(session_id)
            self.counts["context_exceeded"] += 1
            raise GatewayError(f"this model's context is {lim.context_limit} tokens; the prompt is {len(ids)} tokens "
                               f"and max_tokens is {budget}", code="context_length_exceeded", param="messages")
        seed = req.get("seed")
        generators = [torch.Generator().manual_seed(int(seed) + i if seed is not None else secrets.randbits(62))
                      for i in range(n)]
        key = session_id or f"anon-{secrets.token_hex(6)}"
        return {"session": session_id, "prepared": prepared, "ids": ids, "n": n, "budget": budget, "greedy": greedy,
                "generators": generators, "keys": [f"{key}#{i}#" for i in range(n)], "stops": stops,
                "schemas": schemas if choice != "none" else None, "tool_choice": choice,
                "logprobs": bool(req.get("logprobs"))}

    def submit(self, plan: dict) -> Future:
        return self.batcher.generate([plan["ids"]] * plan["n"], [plan["budget"]] * plan["n"], plan["generators"],
                                     plan["greedy"], plan["keys"])

    def finish(self, plan: dict, samples: list[Sample]) -> dict:
        """The OpenAI response body for `samples`, each recorded as a step of the session."""
        choices, replies = [], []
        for i, sample in enumerate(samples):
            sample, stopped = self._apply_stops(sample, plan["stops"])
            text = self.chat.decode([t for t in sample.response_ids if t not in self.chat.stop_ids])
            message, finish = self._message(text, plan)
            if sample.cut and finish == "stop" and not stopped:
                finish = "length"
            choice = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
            if plan["logprobs"]:
                choice["logprobs"] = {"content": self._logprobs(sample)}
            choices.append(choice)
            replies.append((sample, message))
        if plan["session"] is not None:
            self.store.record(plan["session"], plan["prepared"], replies, {"greedy": plan["greedy"]})
        self.counts["completions"] += 1
        completion = sum(len(s.response_ids) for s in samples)
        return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(plan["ids"]), "completion_tokens": completion,
                          "total_tokens": len(plan["ids"]) + completion}}

    def fail(self, plan: dict) -> None:
        if plan["session"] is not None:
            self.store.abandon(plan["session"])

    def _message(self, text: str, plan: dict) -> tuple[dict, str]:
        schemas = plan["schemas"]
        if schemas:
            call = parse_tool_call(text, schemas, self.chat.tool_syntax)
            if isinstance(call, ToolCall):
                before = _text_before_call(text, self.chat.tool_syntax).strip()
                tool_call = {"id": f"call_{secrets.token_hex(8)}", "type": "function",
                             "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
                self.counts["tool_calls"] += 1
                return {"role": "assistant", "content": before or None, "tool_calls": [tool_call]}, "tool_calls"
            if any(m in text for m in MARKERS[self.chat.tool_syntax]) or plan["tool_choice"] == "required":
                self.counts["malformed_tool_calls"] += 1
        return {"role": "assistant", "content": text}, "stop"

    def _apply_stops(self, sample: Sample, stops: list[str]) -> tuple[Sample, bool]:
        """Cut the response before the first token whose text completes a stop string (the ids
        kept are a prefix of those sampled, so they stay exact)."""
        if not stops:
            return sample, False
        ids = sample.response_ids
        for k in range(1, len(ids) + 1):
            if any(s in self.chat.decode(ids[:k]) for s in stops):
                return Sample(ids[: k - 1] or ids[:1], sample.logprobs[: max(k - 1, 1)], False), True
        return sample, False

    def _logprobs(self, sample: Sample) -> list[dict]:
        tok = self.chat.tokenizer
        out = []
        for t, lp in zip(sample.response_ids, sample.logprobs, strict=True):
            piece = tok.decode([t])
            out.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []})
        return out

    def metrics(self) -> dict[str, float]:
        out = self.store.metrics()
        out.update({f"gateway/{k}": float(v) for k, v in self.counts.items()})
        out["gateway/generate_calls"] = float(self.batcher.calls)
        out["gateway/rows_per_generate"] = self.batcher.rows / self.batcher.calls if self.batcher.calls else 0.0
        return out


def _schemas(tools: list[dict]) -> dict[str, dict]:
    out = {}
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GatewayError('each tool must be {"type": "function", "function": {"name": ..., ...}}', param="tools")
        out[fn["name"]] = {k: v for k, v in fn.items() if k != "name"}
    return out


def _with_tool_prompt(messages: list[dict], schemas: dict[str, dict], syntax: str) -> list[dict]:
    text = f"Call a tool as {CALL_EXAMPLES[syntax]}. Tools: {json.dumps(schemas)}"
    if messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{text}".strip()}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def _lists_tools(messages: list[dict], schemas: dict[str, dict]) -> bool:
    """Whether the system message holds these schemas as JSON already (an agent that describes
    its tools itself, e.g. with the built-in environment's own prompt)."""
    return messages[0].get("role") == "system" and json.dumps(schemas) in message_text(messages[0].get("content"))


def _text_before_call(text: str, syntax: str) -> str:
    """The free text before the call: up to the syntax's opening marker (a bare Llama JSON call:
    up to its first brace)."""
    at = text.find(MARKERS[syntax][0])
    if at < 0 and syntax == "llama3_json":
        at = text.find("{")
    return text[: at] if at >= 0 else text


def gateway_for(models, pool_dir, temperature: float = 1.0, limits: Limits | None = None,
                session_timeout_s: float = 600.0, policy_version=lambda: 0, model_name: str = "steppo-policy",
                backend=None, kv_cache: bool = True, threaded: bool = True, batch_wait_s: float = 0.05,
                expected=None) -> Gateway:
    """A gateway over `models` (`steppo.models.build.Models`) generating with the local backend
    (or `backend`), writing finished sessions to the data pool in `pool_dir`. The `Batcher`
    serves on its own thread (`threaded`) or on the thread that calls ``gateway.batcher.serve``;
    a batch waits up to `batch_wait_s` for `expected()` calls (default: the open sessions)."""
    from steppo.gateway.pool import DataPool
    from steppo.rollout.local import LocalBackend

    chat = models.chat
    if backend is None:
        backend = LocalBackend(models.policy.model, {chat.end_of_turn_id} | chat.stop_ids, temperature,
                               models.tokenizer.pad_token_id, kv_cache=kv_cache)
    pool = DataPool(pool_dir)
    store = SessionStore(chat, pool.append, policy_version, session_timeout_s)
    batcher = Batcher(backend, wait_s=batch_wait_s, expected=expected or (lambda: max(1, store.live())),
                      threaded=threaded)
    return Gateway(chat, batcher, store, model_name, temperature, limits, pool)
