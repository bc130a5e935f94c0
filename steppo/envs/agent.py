"""``env=agent``: train an existing agent program through the gateway instead of a `TextEnv`.

The agent is an ordinary function ``run(task: dict, base_url: str) -> float | dict`` (sync or
``async def``), written against the ``openai`` SDK or any framework that takes a base URL: each
episode gets its own session URL (``http://127.0.0.1:PORT/sessions/ID/v1``), every LLM call it
makes is one step (`steppo.gateway.sessions`), and its return value is the episode's reward
(a dict may give ``reward``, ``success`` and ``status``: ``terminated`` or ``truncated``). An
agent that raises ends its episode as ``agent_error`` (counted; never trained on).

Params:
    entrypoint: ``package.module:function`` (imported in the trainer's process).
    tasks: a JSONL file, one JSON object per task, passed to ``run`` as it is; optional keys
        ``id`` (default: its line number) and ``split`` (``train`` / ``dev`` / ``test``;
        default ``train``).
    concurrency: agents running at once (default 8).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from steppo.envs.base import SPLITS, EnvError, EnvSettings, Task, TextEnv, Transition


def load_entrypoint(spec: str):
    """The function ``module:name`` names; EnvError with the reason otherwise."""
    from steppo.envs.registry import with_working_directory

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise EnvError(f"agent entrypoint {spec!r} must be 'package.module:function'")
    with_working_directory()  # a module next to where `steppo` runs, as for env=module:Class
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise EnvError(f"agent entrypoint {spec!r} cannot be loaded: {exc}") from exc
    if not callable(fn):
        raise EnvError(f"agent entrypoint {spec!r} is not callable")
    return fn


class AgentTasks(TextEnv):
    """The tasks of an external agent (never stepped: its agent plays them through the gateway)."""

    name = "agent"
    external = True

    def __init__(self, settings: EnvSettings | None = None, entrypoint: str = "", tasks: str = "",
                 concurrency: int = 8):
        super().__init__(settings)
        if not entrypoint or not tasks:
            raise EnvError("env=agent needs env.params.entrypoint (module:function) and env.params.tasks (a JSONL file)")
        if concurrency < 1:
            raise EnvError("env.params.concurrency must be >= 1")
        self.entrypoint, self.concurrency = entrypoint, concurrency
        path = Path(tasks)
        if not path.is_file():
            raise EnvError(f"env.params.tasks={tasks!r}: no such file")
        self._tasks: dict[str, list[Task]] = {s: [] for s in SPLITS}
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                payload = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EnvError(f"{path}:{i + 1}: not JSON ({exc.msg})") from exc
            if not isinstance(payload, dict):
                raise EnvError(f"{path}:{i + 1}: a task must be a JSON object")
            split = payload.get("split", "train")
            if split not in SPLITS:
                raise EnvError(f"{path}:{i + 1}: split {split!r} is not one of {SPLITS}")
            self._tasks[split].append(Task(id=str(payload.get("id", f"line{i + 1}")), split=split, seed=i,
                                           payload=payload))

    def tasks(self, split: str) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"agent tasks have splits {list(SPLITS)}, not {split!r}")
        return list(self._tasks[split])

    def system_prompt(self) -> str:
        return ""

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        """The task as text (what the `tiny` tokenizer's corpus reads); the agent plays it."""
        return json.dumps(task.payload, ensure_ascii=False), {}

    def _act(self, action) -> Transition:
        raise EnvError("env=agent is played by its agent through the gateway, not stepped")
