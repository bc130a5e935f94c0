"""Reading an action out of a response: Qwen/Hermes tool calls or plain-text commands.

A malformed action is a value (`MalformedAction`), not an exception: the environment answers it
with an error observation (and an optional penalty), metrics count it, the episode goes on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MalformedAction:
    """Why an action could not be read; shown to the agent as the observation."""

    reason: str


def parse_tool_call(text: str, tools: dict[str, dict] | None = None) -> ToolCall | MalformedAction:
    """Read the first ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in `text`.

    `tools` maps tool names to JSON schemas (``{"parameters": {"required": [...]}}``); when given,
    unknown tools and missing required arguments are malformed too.
    """
    match = TOOL_CALL_RE.search(text)
    if match is None:
        return MalformedAction("no <tool_call>...</tool_call> block in the response")
    if not match.group(2):
        return MalformedAction("the <tool_call> block is not closed with </tool_call>")
    body = match.group(1).strip()
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        return MalformedAction(f"the tool call is not valid JSON ({exc.msg} at char {exc.pos})")
    except RecursionError:  # e.g. '[[[[...' thousands deep: the model's fault, not the environment's
        return MalformedAction("the tool call's JSON is nested too deeply")
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return MalformedAction('the tool call must be a JSON object with a string "name"')
    args = payload.get("arguments", {})
    if isinstance(args, str):  # some models emit arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return MalformedAction('"arguments" is a string that is not valid JSON')
        except RecursionError:
            return MalformedAction('"arguments" is a JSON string nested too deeply')
    if not isinstance(args, dict):
        return MalformedAction('"arguments" must be a JSON object')
    name = payload["name"]
    if tools is not None:
        if name not in tools:
            return MalformedAction(f"unknown tool {name!r}; available: {', '.join(sorted(tools))}")
        required = tools[name].get("parameters", {}).get("required", [])
        missing = [r for r in required if r not in args]
        if missing:
            return MalformedAction(f"tool {name!r} is missing required arguments: {', '.join(missing)}")
    return ToolCall(name=name, arguments=args)


def parse_command(text: str) -> str | MalformedAction:
    """A plain-text command: the text after the last ``Action:`` if present (ReAct style),
    else the last non-empty line, lower-cased and stripped."""
    if "Action:" in text:
        text = text.rsplit("Action:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return MalformedAction("empty response: no command to execute")
    return lines[-1].strip().rstrip(".").lower()


def tool_call_text(name: str, **arguments: Any) -> str:
    """The canonical text of a tool call (for expert demonstrations and prompts)."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"
