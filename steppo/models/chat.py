"""Chat formatting as token ids: the first prompt rendered once, then only new turns appended.

The first prompt of an episode goes through the tokenizer's chat template. After that, a
cumulative context grows by appending ids: the response exactly as sampled, then the ids of the
next user turn (the observation) and the generation prompt. History is never re-rendered or
re-tokenised, so step t+1's prompt starts with step t's exact prompt + response ids.

The template need not be append-only: a new turn is rendered as the *delta* of the template,
the text that follows the last assistant message's content in a rendering that ends with the new
user message and the generation prompt. Templates that rewrite earlier turns (Qwen3 drops the
``<think>`` blocks of earlier assistant turns) work as they are: the earlier turns keep the ids
the policy saw and sampled. The delta is probed with sentinel contents and must be the same after
different histories (with and without a system message, after several turns, after an assistant
turn that holds a ``<think>...</think>`` block); a template whose delta is not is refused with an
error naming ``model.chat_template``. The end-of-turn token is read from the template: the first
token after an assistant message's content (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<|end|>``),
whatever the tokenizer's eos token is.

Tools the model's own way: when the template presents tools (``apply_chat_template(tools=...)``
renders them, as Qwen2.5/Qwen3's, Llama 3.1's and Mistral's do), the first prompt carries the
environment's tool schemas there and the environment's instructions leave them out; the
tool-call syntax the template teaches (`steppo.envs.actions.TOOL_SYNTAXES`) is read from it, or
set with ``model.tool_format``; and when the template renders ``tool`` messages consistently,
the answer to a well-formed tool call is appended as a ``tool`` turn (Qwen's
``<tool_response>`` block, Llama's ``ipython`` turn) rather than a user turn. A template without
tools gets them described in the system prompt (``model.native_tools=false`` forces that).
"""

from __future__ import annotations

import json

import jinja2
from transformers import PreTrainedTokenizerBase

from steppo.core.choices import ConfigError
from steppo.envs.actions import MARKERS, TOOL_SYNTAXES

_A, _B, _O, _U, _V, _S, _T = (f"\u2063STEPPO_{k}\u2063" for k in "ABOUVST")
FIX = ("set model.chat_template=PATH (a Jinja chat template file whose turns can be appended) "
       "or model.chat_template=chatml")
_TOOL_OBS = "STEPPO_TOOL_RESULT_7f3a"  # ASCII: templates may JSON-escape a tool message (Llama's tojson)
PROBE_TOOLS = [{"type": "function", "function": {
    "name": "steppo_probe_tool", "description": "a probe",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]


def message_text(content) -> str:
    """An OpenAI message's content as text (``None`` -> "", content parts -> their text joined)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def call_arguments(fn: dict):
    """An OpenAI tool call's arguments as a JSON value (the SDK sends them as a JSON string; one
    that does not parse stays the string)."""
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            pass
    return args


def _template_call(call: dict) -> dict:
    """An OpenAI tool call with its arguments as an object (templates apply ``tojson`` to them)."""
    fn = dict(call.get("function") or {})
    fn["arguments"] = call_arguments(fn)
    return {"type": "function", "function": fn, **({"id": call["id"]} if "id" in call else {})}


def template_tool_syntax(template: str, rendered: str) -> str | None:
    """The tool-call syntax a chat template teaches, read from its source and its rendering of a
    tool list; None when it is none StepPO knows."""
    text = template + rendered
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text or "[AVAILABLE_TOOLS]" in text:
        return "mistral"
    if "ipython" in text or '"parameters": dictionary' in text or "<|python_tag|>" in text:
        return "llama3_json"
    return None


class ChatFormat:
    """Token-level chat turns for one tokenizer.

    Attributes:
        end_of_turn_id: the token that closes an assistant turn (a stop token for generation).
        stop_ids: the ids that end a response: the end-of-turn token and the tokenizer's eos.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tool_format: str = "auto",
                 native_tools: bool | None = None):
        """`tool_format`: ``auto`` (the syntax the template teaches; ``hermes`` when it teaches
        none) or one of `TOOL_SYNTAXES`; `native_tools`: schemas through the template (None =
        when it renders them)."""
        if not tokenizer.chat_template:
            raise ConfigError(f"the tokenizer has no chat template; {FIX}")
        self.tokenizer = tokenizer
        self._system_role = True
        try:
            self._render([{"role": "system", "content": _S}, {"role": "user", "content": _U}], True)
        except jinja2.TemplateError:  # e.g. Mistral's: no system role, so it joins the first user turn
            self._system_role = False
        deltas = {}
        histories = {
            "one turn": [],
            "a system message": [{"role": "system", "content": _S}],
            "earlier turns": [{"role": "user", "content": _V}, {"role": "assistant", "content": _B}],
        }
        for label, head in histories.items():
            deltas[label] = self._probe(head + [{"role": "user", "content": _U}], _A)
        thought = f"<think>\n{_T}\n</think>\n\n{_A}"
        deltas["an assistant turn with a <think> block"] = self._probe([{"role": "user", "content": _U}], _A, thought)
        first = next(iter(deltas.values()))
        for label, delta in deltas.items():
            if delta != first:
                self._refuse(f"the text it renders for a new user turn after {label} ({delta!r}) differs from "
                             f"the one after one turn ({first!r})")
        before, sep, after = first.partition(_O)
        if not sep or _O in after or any(s in first for s in (_A, _B, _U, _V, _S, _T)):
            self._refuse(f"its new user turn {first!r} does not hold the user message once, and only it")
        generation = self._generation_prompt()
        if generation is not None and not after.endswith(generation):
            self._refuse(f"its new user turn {first!r} does not end with the generation prompt {generation!r}")
        ids = self.encode(first)
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        if not ids or ids[0] not in special:
            self._refuse(f"an assistant turn is followed by {first[:20]!r}, which does not start with a special "
                         f"end-of-turn token")
        self.end_of_turn_id: int = ids[0]
        self._eot_text = tokenizer.convert_ids_to_tokens(ids[0])
        if not first.startswith(self._eot_text):
            self._refuse(f"its end-of-turn token {self._eot_text!r} is not the text after an assistant message")
        self.stop_ids: set[int] = {self.end_of_turn_id}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self._resolve_tools(tool_format, native_tools, first)

    def _resolve_tools(self, tool_format: str, native_tools: bool | None, user_delta: str) -> None:
        """Sets `native_tools` (schemas go through the template), `tool_syntax` (one of
        `TOOL_SYNTAXES`) and `tool_role` (observations of tool calls are ``tool`` turns)."""
        if tool_format != "auto" and tool_format not in TOOL_SYNTAXES:
            raise ConfigError(f"model.tool_format={tool_format!r}: choose auto or one of {', '.join(TOOL_SYNTAXES)}")
        plain = self._render([{"role": "user", "content": _U}], True)
        try:
            with_tools = self._render([{"role": "user", "content": _U}], True, PROBE_TOOLS)
        except jinja2.TemplateError:
            with_tools = plain
        renders = with_tools != plain and "steppo_probe_tool" in with_tools
        if native_tools and not renders:
            raise ConfigError("model.native_tools=true, but this chat template does not render a tool list "
                              "(apply_chat_template(tools=...) leaves the prompt unchanged); set "
                              "model.native_tools=false or a template with tools (model.chat_template=PATH)")
        # Tools must not change how a later turn renders (Mistral's put them before the *last* user
        # message): such a template gets the tools described in the system prompt instead.
        appendable = not renders or self._probe([{"role": "user", "content": _U}], _A, tools=PROBE_TOOLS) == user_delta
        if native_tools and not appendable:
            self._refuse("with tools given, a new user turn renders differently (model.native_tools=false "
                         "describes the tools in the system prompt instead)")
        self.native_tools = renders and appendable if native_tools is None else native_tools
        detected = template_tool_syntax(self.tokenizer.chat_template, with_tools if renders else "")
        if tool_format != "auto":
            self.tool_syntax = tool_format
        elif self.native_tools and detected is None:
            raise ConfigError("this chat template presents tools, but StepPO cannot tell which tool-call syntax it "
                              f"teaches; set model.tool_format to one of {', '.join(TOOL_SYNTAXES)} (or "
                              "model.native_tools=false to describe the tools in the system prompt)")
        else:
            self.tool_syntax = detected or "hermes"
        self.tool_role = self.native_tools and self._tool_turns_consistent()
        special = {tid for tid, tok in self.tokenizer.added_tokens_decoder.items() if tok.special}
        special |= set(self.tokenizer.all_special_ids)
        markers = [self.tokenizer.convert_tokens_to_ids(m) for m in MARKERS[self.tool_syntax]]
        self._kept_ids = {i for i in markers if i in special}  # decoded although special: the parser needs them

    def _tool_turns_consistent(self) -> bool:
        """Whether a ``tool`` turn after an assistant turn renders as one appendable delta: the
        observation once, after the end-of-turn text, ending with the generation prompt, the
        same after one turn and after several."""
        heads = ([{"role": "user", "content": _U}],
                 [{"role": "user", "content": _V}, {"role": "assistant", "content": _B}, {"role": "user", "content": _U}])
        try:
            deltas = {self._probe(h, _A, observation=_TOOL_OBS, role="tool", tools=PROBE_TOOLS) for h in heads}
        except ConfigError:
            return False
        delta = deltas.pop()
        generation = self._generation_prompt()
        return (not deltas and delta.count(_TOOL_OBS) == 1 and delta.startswith(self._eot_text)
                and (generation is None or delta.endswith(generation)))

    def _refuse(self, why: str):
        raise ConfigError(f"this chat template cannot be extended turn by turn: {why}; {FIX}")

    def _render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _messages(self, system: str | None, user: str) -> list[dict]:
        if system and not self._system_role:
            return [{"role": "user", "content": f"{system}\n\n{user}"}]
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def _probe(self, head: list[dict], marker: str, content: str | None = None, observation: str = _O,
               role: str = "user", tools: list[dict] | None = None) -> str:
        """The text after the last assistant message's content (`marker`) in a rendering of `head`,
        that message and a new `role` message `observation`, with the generation prompt."""
        if head and head[0]["role"] == "system" and not self._system_role:
            head = self._messages(head[0]["content"], head[1]["content"]) + head[2:]
        messages = head + [{"role": "assistant", "content": content or marker},
                           {"role": role, "content": observation}]
        try:
            text = self._render(messages, add_generation_prompt=True, tools=tools)
        except jinja2.TemplateError as exc:
            self._refuse(f"it fails on a multi-turn conversation ({exc})")
        at = text.find(marker)
        if at < 0:
            self._refuse("it does not render an earlier assistant message's content")
        return text[at + len(marker):]

    def _generation_prompt(self) -> str | None:
        messages = [{"role": "user", "content": _U}]
        bare, prompt = self._render(messages), self._render(messages, add_generation_prompt=True)
        return prompt[len(bare):] if prompt.startswith(bare) and prompt != bare else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def initial_prompt(self, system: str | None, user: str, tools: list[dict] | None = None) -> list[int]:
        """Ids of [system], user, then the assistant generation prompt; `tools` (OpenAI-format
        schemas) are rendered by the template when it presents tools (`native_tools`)."""
        tools = tools if tools and self.native_tools else None
        return self.encode(self._render(self._messages(system, user), add_generation_prompt=True, tools=tools))

    def observation_ids(self, observation: str, response_closed: bool, tool_result: bool = False) -> list[int]:
        """Ids to append after a response: the template's new turn holding the observation (a
        ``tool`` turn for the result of a well-formed tool call when the template has them, else
        a user turn) and the next generation prompt, with its end-of-turn token first unless the
        response closed with it already."""
        return self.continuation_ids([{"role": "tool" if tool_result else "user", "content": observation}],
                                     response_closed)

    def conversation_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A whole conversation (OpenAI-style messages) rendered by the template, with the
        generation prompt: the start of a new chain (the gateway, when an agent's history is not
        one it was given). ``tool`` messages become user turns where the template has no tool
        turns; without a system role the system message joins the first user message."""
        messages = self._normalised(messages)
        if messages and messages[0]["role"] == "system" and not self._system_role:
            rest = messages[1:]
            first = rest[0]["content"] if rest and rest[0]["role"] == "user" else ""
            messages = self._messages(messages[0]["content"], first) + rest[1 if first else 0:]
        return self.encode(self._render(messages, True, tools if tools and self.native_tools else None))

    def continuation_ids(self, messages: list[dict], response_closed: bool, tools: list[dict] | None = None) -> list[int]:
        """Ids to append after an assistant turn for the non-assistant `messages` that follow it
        (tool results, a user message; several at once), then the generation prompt: the
        template's delta, as `observation_ids` renders one observation."""
        messages = self._normalised(messages)
        if not messages or any(m["role"] in ("assistant", "system") for m in messages):
            raise ValueError("a continuation holds only user and tool messages")
        native = tools if tools and self.native_tools else None
        head = [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}]
        try:
            text = self._render(head + messages, True, native or (PROBE_TOOLS if self.tool_role else None))
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template cannot render these messages: {exc}") from exc
        at = text.find(_A)
        ids = self.encode(text[at + len(_A):])
        return ids[1:] if response_closed and ids[:1] == [self.end_of_turn_id] else ids

    def _normalised(self, messages: list[dict]) -> list[dict]:
        """Messages as templates take them: text content, tool turns only where the template
        has them, assistant tool-call arguments as objects."""
        out = []
        for m in messages:
            role, content = m["role"], message_text(m.get("content"))
            if role == "tool" and not self.tool_role:
                role = "user"
            msg = {"role": role, "content": content}
            if role == "assistant" and m.get("tool_calls"):
                msg["tool_calls"] = [_template_call(c) for c in m["tool_calls"]]
            out.append(msg)
        return out

    def decode(self, ids: list[int]) -> str:
        """The response text, special tokens left out except the tool-call markers (Mistral's
        ``[TOOL_CALLS]``, Llama's ``<|python_tag|>``) the parser reads."""
        if not self._kept_ids or not self._kept_ids.intersection(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        parts, run = [], []
        for i in ids:
            if i in self._kept_ids:
                parts += [self.tokenizer.decode(run, skip_special_tokens=True), self.tokenizer.convert_ids_to_tokens(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self.tokenizer.decode(run, skip_special_tokens=True)])
