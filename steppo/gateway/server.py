"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of a `Gateway`.

Routes::

    GET  /v1/models                               the policy
    POST /v1/chat/completions                     a call outside any session (served, not recorded)
    POST /sessions/{id}/v1/chat/completions       a step of session `id` (an agent sets base_url to
    GET  /sessions/{id}/v1/models                 http://127.0.0.1:PORT/sessions/ID/v1)
    POST /sessions/{id}/reward                    {"reward": 1.0} or {"reward": 0.2, "step": 3}
    POST /sessions/{id}/end                       {"status": "terminated" | "truncated", "success": true}
    GET  /gateway/metrics                         counters (prefix_extended_frac, retokenized_turns, ...)

Requests are validated (pydantic; unknown fields are ignored, as OpenAI's SDKs send many);
errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. ``stream=true``
answers with server-sent events (the response is generated, then sent as chunks: a role chunk,
content deltas, tool-call deltas, the finish reason, optional usage, ``[DONE]``). Safe by
default: binds 127.0.0.1, optional bearer API key, a body-size limit, per-session and global
concurrency limits (429 when exceeded).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from steppo.gateway.service import Gateway, GatewayError
from steppo.gateway.sessions import SessionError

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1)
    seed: int | None = None
    logprobs: bool | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None


class RewardRequest(BaseModel):
    reward: float
    step: int | None = Field(default=None, ge=0)


class EndRequest(BaseModel):
    status: Literal["terminated", "truncated"] = "terminated"
    success: bool | None = None


def _error(status: int, message: str, code: str | None = None, param: str | None = None):
    from fastapi.responses import JSONResponse

    kind = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class _Guard:
    """API key and body-size checks before routing, as plain ASGI (Starlette's ``@middleware``
    wraps every response in a stream: a cost on every call)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if self.api_key is not None and not secrets.compare_digest(auth, f"Bearer {self.api_key}"):
                return await _error(401, "missing or wrong API key (Authorization: Bearer ...)",
                                    "invalid_api_key")(scope, receive, send)
            size = headers.get(b"content-length", b"").decode("latin-1")
            if size.isdigit() and int(size) > self.max_body_bytes:
                return await _error(413, f"request body over {self.max_body_bytes} bytes")(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(gateway: Gateway, api_key: str | None = None, max_body_bytes: int = 4 * 2**20,
               max_concurrent: int = 256, expire_every_s: float = 5.0):
    """The ASGI app. `max_concurrent`: chat completions in flight at once (more get 429)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    inflight = {"n": 0}

    @asynccontextmanager
    async def lifespan(app):
        async def expire():
            while True:
                await asyncio.sleep(expire_every_s)
                for sid in await run_in_threadpool(gateway.store.expire):
                    gateway.batcher.release(f"{sid}#")

        task = asyncio.create_task(expire())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="StepPO gateway", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", [])[1:])
        return _error(400, f"invalid request: {where}: {first.get('msg', exc)}", param=where or None)

    @app.exception_handler(GatewayError)
    async def refused(request, exc: GatewayError):
        return _error(exc.status, str(exc), exc.code, exc.param)

    @app.exception_handler(SessionError)
    async def session_error(request, exc: SessionError):
        return _error(exc.status, str(exc))

    def models_body():
        return {"object": "list", "data": [{"id": gateway.model_name, "object": "model", "created": gateway.created,
                                            "owned_by": "steppo"}]}

    @app.get("/v1/models")
    async def models():
        return models_body()

    @app.get("/sessions/{sid}/v1/models")
    async def session_models(sid: str):
        return models_body()

    async def complete(sid: str | None, req: ChatRequest):
        if sid is not None and not SESSION_ID.match(sid):
            raise GatewayError("a session id is 1-128 characters of A-Z a-z 0-9 _ . : -", 400)
        if inflight["n"] >= max_concurrent:
            raise GatewayError(f"the gateway is serving {max_concurrent} calls; retry", 429)
        inflight["n"] += 1
        try:
            body = req.model_dump(exclude_none=True)
            body["messages"] = [m.model_dump(exclude_none=True) for m in req.messages]
            plan = await run_in_threadpool(gateway.prepare, sid, body)
            try:
                samples = await asyncio.wrap_future(gateway.submit(plan))
                result = await run_in_threadpool(gateway.finish, plan, samples)
            except BaseException:
                gateway.fail(plan)
                raise
        finally:
            inflight["n"] -= 1
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(result, include_usage, gateway.chat.tokenizer),
                                     media_type="text/event-stream")
        return JSONResponse(result)  # already JSON-shaped: no encoder pass

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await complete(None, req)

    @app.post("/sessions/{sid}/v1/chat/completions")
    async def session_chat(sid: str, req: ChatRequest):
        return await complete(sid, req)

    @app.post("/sessions/{sid}/reward")
    async def reward(sid: str, req: RewardRequest):
        gateway.store.reward(sid, req.reward, req.step)
        return {"session": sid, "ok": True}

    @app.post("/sessions/{sid}/end")
    async def end(sid: str, req: EndRequest | None = None):
        req = req or EndRequest()
        traj = await run_in_threadpool(gateway.store.end, sid, req.status, req.success)
        gateway.batcher.release(f"{sid}#")
        return {"session": sid, "steps": len(traj.steps) if traj else 0,
                "reward": sum(s.reward for s in traj.steps) if traj else 0.0}

    @app.get("/gateway/metrics")
    async def metrics():
        return gateway.metrics()

    return app


def _events(result: dict, include_usage: bool, tokenizer):
    """The completion as OpenAI ``chat.completion.chunk`` server-sent events."""
    base = {"id": result["id"], "object": "chat.completion.chunk", "created": result["created"],
            "model": result["model"]}

    def event(choices, **extra):
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

    for c in result["choices"]:
        i, msg = c["index"], c["message"]
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        content = msg.get("content") or ""
        for piece in _pieces(content, tokenizer):
            yield event([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
        for k, call in enumerate(msg.get("tool_calls") or []):
            yield event([{"index": i, "delta": {"tool_calls": [{"index": k, **call}]}, "finish_reason": None}])
        yield event([{"index": i, "delta": {}, "finish_reason": c["finish_reason"]}])
    if include_usage:
        yield event([], usage=result["usage"])
    yield "data: [DONE]\n\n"


def _pieces(text: str, tokenizer) -> list[str]:
    """`text` in token-sized pieces (what a streaming client would have seen arrive)."""
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False)
    out, prev = [], ""
    for k in range(1, len(ids) + 1):
        now = tokenizer.decode(ids[:k])
        if now.startswith(prev) and len(now) > len(prev) and not now.endswith("\ufffd"):
            out.append(now[len(prev):])
            prev = now
    if prev != text:
        out.append(text[len(prev):] if text.startswith(prev) else text)
    return out


def listening_socket(host: str, port: int):
    """A bound TCP socket with Nagle's algorithm off. Accepted connections inherit it: without it a
    response written in two parts (headers, body) waits for the client's delayed ACK, 40 ms per
    call on Linux loopback (measured here: 38-45 ms for an empty GET)."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


class BackgroundServer:
    """`app` served by uvicorn on a thread (tests, benchmarks, the trainer's agent runner):
    ``with BackgroundServer(app) as url: ...`` (``url`` = ``http://127.0.0.1:PORT``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import threading

        import uvicorn

        self._sock = listening_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the gateway server did not start in 30 s")
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
