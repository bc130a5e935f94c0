"""Reading an action out of a response: tool calls in a model family's syntax, or plain-text commands.

Tool-call syntaxes (`TOOL_SYNTAXES`), each the format a chat template teaches its model:

* ``hermes`` (Qwen2.5/Qwen3, Hermes, SmolLM3, and StepPO's prompt format for templates without
  tools): ``<tool_call>{"name": "search", "arguments": {"query": "x"}}</tool_call>``;
* ``llama3_json`` (Llama 3.1-3.3): a bare JSON object ``{"name": "search", "parameters": {...}}``
  (optionally after ``<|python_tag|>``);
* ``mistral`` (Mistral v3 / Nemo): ``[TOOL_CALLS] [{"name": "search", "arguments": {...}}]``, or the
  v11 form ``[TOOL_CALLS]search[ARGS]{...}``.

Every parser reads the *first* call after any free text (a ReAct thought), accepts
``arguments`` or ``parameters`` and arguments given as a JSON string, and checks the call
against the tool schemas when given. `render_tool_call` writes a call the way that syntax does
(what expert demonstrations and the gateway emit); parsing what it renders gives the call back.

A malformed action is a value (`MalformedAction`), not an exception: the environment answers it
with an error observation (and an optional penalty), metrics count it, the episode goes on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, get_args

from steppo.core.choices import ToolFormat

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
TOOL_SYNTAXES = tuple(s for s in get_args(ToolFormat) if s != "auto")  # ("hermes", "llama3_json", "mistral")
CALL_EXAMPLES = {  # how each syntax is described to a model whose chat template does not present tools
    "hermes": '<tool_call>{"name": ..., "arguments": {...}}</tool_call>',
    "llama3_json": '{"name": ..., "parameters": {...}}',
    "mistral": '[TOOL_CALLS] [{"name": ..., "arguments": {...}}]',
}
MARKERS = {"hermes": ("<tool_call>", "</tool_call>"), "llama3_json": ("<|python_tag|>",),
           "mistral": ("[TOOL_CALLS]", "[ARGS]")}  # tokens a decoder must keep for the parser to see them


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MalformedAction:
    """Why an action could not be read; shown to the agent as the observation."""

    reason: str


def parse_tool_call(text: str, tools: dict[str, dict] | None = None,
                    syntax: str = "hermes") -> ToolCall | MalformedAction:
    """The first tool call in `text`, written in `syntax` (one of `TOOL_SYNTAXES`).

    `tools` maps tool names to JSON schemas (``{"parameters": {"required": [...]}}``); when given,
    unknown tools and missing required arguments are malformed too.
    """
    if syntax == "hermes":
        payload = _hermes_payload(text)
    elif syntax == "llama3_json":
        payload = _first_json_object(text.replace("<|python_tag|>", " "), "a JSON object with a \"name\"")
    elif syntax == "mistral":
        payload = _mistral_payload(text)
    else:
        raise ValueError(f"unknown tool-call syntax {syntax!r}; choose one of {TOOL_SYNTAXES}")
    if isinstance(payload, MalformedAction):
        return payload
    return _checked_call(payload, tools)


def _hermes_payload(text: str) -> dict | MalformedAction:
    match = TOOL_CALL_RE.search(text)
    if match is None:
        return MalformedAction("no <tool_call>...</tool_call> block in the response")
    if not match.group(2):
        return MalformedAction("the <tool_call> block is not closed with </tool_call>")
    return _loads(match.group(1).strip(), "the tool call")


def _mistral_payload(text: str) -> dict | MalformedAction:
    if "[TOOL_CALLS]" not in text:
        return MalformedAction("no [TOOL_CALLS] in the response")
    body = text.split("[TOOL_CALLS]", 1)[1]
    if "[ARGS]" in body and not body.lstrip().startswith(("[", "{")):  # v11: name[ARGS]{...}
        name, _, args = body.partition("[ARGS]")
        loaded = _loads(args.strip(), "the [ARGS] of the tool call", prefix=True)
        return loaded if isinstance(loaded, MalformedAction) else {"name": name.strip(), "arguments": loaded}
    payload = _loads(body.strip(), "the [TOOL_CALLS] list", prefix=True)
    if isinstance(payload, list):
        if not payload:
            return MalformedAction("the [TOOL_CALLS] list is empty")
        payload = payload[0]
    return payload


def _loads(body: str, what: str, prefix: bool = False) -> Any:
    """JSON of `body` (with `prefix`: of its longest leading JSON value) or a MalformedAction."""
    try:
        return json.JSONDecoder().raw_decode(body)[0] if prefix else json.loads(body)
    except json.JSONDecodeError as exc:
        return MalformedAction(f"{what} is not valid JSON ({exc.msg} at char {exc.pos})")
    except RecursionError:  # e.g. '[[[[...' thousands deep: the model's fault, not the environment's
        return MalformedAction(f"{what}'s JSON is nested too deeply")


def _first_json_object(text: str, what: str) -> dict | MalformedAction:
    """The first JSON object in `text` that has a "name" (free text may come before it)."""
    decoder, at, error = json.JSONDecoder(), text.find("{"), None
    while at >= 0:
        try:
            value = decoder.raw_decode(text, at)[0]
        except json.JSONDecodeError as exc:
            error = error or f" (the first one: {exc.msg} at char {exc.pos - at})"
        except RecursionError:
            return MalformedAction("the tool call's JSON is nested too deeply")
        else:
            if isinstance(value, dict) and "name" in value:
                return value
        at = text.find("{", at + 1)
    return MalformedAction(f"no tool call ({what}) in the response{error or ''}")


def _checked_call(payload: Any, tools: dict[str, dict] | None) -> ToolCall | MalformedAction:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return MalformedAction('the tool call must be a JSON object with a string "name"')
    args = payload.get("arguments", payload.get("parameters", {}))
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


def render_tool_call(call: ToolCall, syntax: str = "hermes", native: bool = False) -> str:
    """`call` as a model of `syntax` writes it. ``native``: the way the family's own chat
    template renders an assistant's tool call (Qwen's ``<tool_call>`` block on lines of its own);
    else StepPO's compact prompt format (``hermes``: ``<tool_call>{...}</tool_call>``)."""
    if syntax == "hermes":
        body = json.dumps({"name": call.name, "arguments": call.arguments})
        return f"<tool_call>\n{body}\n</tool_call>" if native else f"<tool_call>{body}</tool_call>"
    if syntax == "llama3_json":
        return json.dumps({"name": call.name, "parameters": call.arguments})
    if syntax == "mistral":
        return "[TOOL_CALLS] " + json.dumps([{"name": call.name, "arguments": call.arguments}])
    raise ValueError(f"unknown tool-call syntax {syntax!r}; choose one of {TOOL_SYNTAXES}")


def tool_call_text(name: str, **arguments: Any) -> str:
    """Shorthand: ``render_tool_call(ToolCall(name, arguments))`` in the prompt ``hermes`` format."""
    return render_tool_call(ToolCall(name, arguments))


def openai_tools(tools: dict[str, dict]) -> list[dict]:
    """Tool schemas (name -> {"description", "parameters"}) as the OpenAI ``tools`` list that
    ``apply_chat_template(tools=...)`` and the OpenAI API take."""
    return [{"type": "function", "function": {"name": name, **schema}} for name, schema in tools.items()]
