"""The text-environment interface StepPO trains against (gymnasium-like, text in and out).

An environment owns a fixed set of tasks per split (``train`` is what training samples; the
evaluation splits are never sampled for training), resets to one task, and steps on the agent's
raw response text::

    env = make_env(cfg)
    obs, info = env.reset(env.tasks("train")[0])
    result = env.step("go north")          # -> Transition(observation, reward, terminated, truncated, info)

``info`` keys the engine reads (all optional): ``success`` (bool, episode solved), ``score``,
``invalid_action`` (bool: malformed or inadmissible action), ``anchor`` (canonical environment
state key, for GiGPO; never the rendered prompt), ``admissible`` (list of valid commands).

The engine checks every result at this boundary (`checked_reset`, `checked_transition`): a
``None`` or non-string observation, a non-finite or non-numeric reward, a wrong return type
or an exception ends that episode as ``env_error`` with the reason, never the run.
"""

from __future__ import annotations

import abc
import json
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from steppo.envs.actions import (
    CALL_EXAMPLES,
    MalformedAction,
    ToolCall,
    openai_tools,
    parse_command,
    parse_tool_call,
    render_tool_call,
)

SPLITS = ("train", "dev", "test")


class EnvError(RuntimeError):
    """An environment that cannot be built or used (missing package, data or bad settings)."""


class EnvOutputError(EnvError):
    """An environment returned something that is not a valid reset/step result (a ``None``
    observation, a non-finite reward, a tuple of the wrong length...). The engine ends the
    episode as ``env_error`` with this message; the run goes on."""


@dataclass(frozen=True)
class Task:
    """One reproducible task: `id` is unique within the environment, `seed` fixes its content."""

    id: str
    split: str
    seed: int
    payload: dict[str, Any] = field(default_factory=dict)


class Transition(NamedTuple):
    observation: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


def checked_reset(out: Any, env_name: str = "env") -> tuple[str, dict[str, Any]]:
    """`out` of ``env.reset`` if it is ``(observation: str, info: dict)``, else `EnvOutputError`."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise EnvOutputError(f"{env_name}: reset() must return (observation, info), got {_describe(out)}")
    observation, info = out
    if not isinstance(observation, str):
        raise EnvOutputError(f"{env_name}: reset() returned a {_describe(observation)} observation (expected str)")
    if not isinstance(info, dict):
        raise EnvOutputError(f"{env_name}: reset() returned {_describe(info)} as info (expected dict)")
    return observation, info


def checked_transition(out: Any, env_name: str = "env") -> Transition:
    """The step boundary: `out` of ``env.step`` as a `Transition` (a plain 5-tuple is accepted),
    or `EnvOutputError` naming what is wrong. A non-finite reward is rejected here, so it never
    reaches credit assignment (one NaN reward would make every advantage, loss and weight NaN)."""
    if not isinstance(out, tuple) or len(out) != 5:
        raise EnvOutputError(f"{env_name}: step() must return a Transition (observation, reward, terminated, "
                             f"truncated, info), got {_describe(out)}")
    observation, reward, terminated, truncated, info = out
    if not isinstance(observation, str):
        raise EnvOutputError(f"{env_name}: step() returned a {_describe(observation)} observation (expected str)")
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
        raise EnvOutputError(f"{env_name}: step() returned {_describe(reward)} as reward (expected a number)")
    if not math.isfinite(float(reward)):
        raise EnvOutputError(f"{env_name}: non-finite reward {float(reward)} from step()")
    if not isinstance(info, dict):
        raise EnvOutputError(f"{env_name}: step() returned {_describe(info)} as info (expected dict)")
    return Transition(observation, float(reward), bool(terminated), bool(truncated), info)


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, tuple):
        return f"a tuple of length {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


@dataclass
class EnvOptions:
    """Settings every environment shares that the config sets as they are: the config's ``env``
    section (`steppo.config.EnvConfig`) and `EnvSettings` both extend this class, so each default
    is written once and `steppo.envs.registry.env_factory` copies them generically.

    Attributes:
        invalid_action_penalty: reward added for a malformed or inadmissible action.
        format_penalty: reward added when the response does not follow the required format
            (e.g. a missing tool-call block); counted with invalid actions.
        react: ask for ReAct-style responses (a short thought, then the action); the action
            parsers read the action after the thought.
        step_delay_s: extra latency of every step (sleep), to model slow environments (a
            browser, a remote search API) in benchmarks.
    """

    invalid_action_penalty: float = 0.0
    format_penalty: float = 0.0
    react: bool = False
    step_delay_s: float = 0.0


@dataclass
class EnvSettings(EnvOptions):
    """Settings every environment shares: `EnvOptions`, and the ones each environment class
    defaults for its task family (`TextEnv.default_settings`).

    Attributes:
        max_steps: episode step limit (the engine ends episodes there); None = the
            environment's own default for its task family, filled in at construction.
        show_admissible: list the valid commands in each observation.
        max_new_tokens: the response budget this environment's actions need (used when
            rollout.max_new_tokens is not set).
        tool_syntax: how tool calls are written and parsed (`steppo.envs.actions.TOOL_SYNTAXES`),
            and native_tools: whether the chat template presents the tool schemas (else the
            instructions describe them). Both follow the model's chat template
            (`steppo.models.chat.ChatFormat`); the trainer sets them (`registry.with_tools`).
    """

    max_steps: int | None = 10
    show_admissible: bool = True
    max_new_tokens: int = 64
    tool_syntax: str = "hermes"
    native_tools: bool = False


class TextEnv(abc.ABC):
    """Base class: subclasses implement `tasks`, `_reset`, `_act` and optionally `expert_actions`.

    `step` turns the response into an action (command or tool call), answers malformed ones
    with an error observation and the configured penalty, and counts the step.
    """

    name: str = "env"
    action_format: str = "text"  # "text" or "tool_call"
    corpus_tasks: int = 400  # training tasks whose text trains the `tiny` tokenizer
    tools: dict[str, dict] | None = None  # tool name -> JSON schema, for tool_call envs
    external = False  # played by an agent program through the gateway (env=agent), not stepped here

    def __init__(self, settings: EnvSettings | None = None):
        self.settings = settings or self.default_settings()
        self.task: Task | None = None
        self.steps_taken = 0

    @classmethod
    def default_settings(cls) -> EnvSettings:
        """The settings this environment runs with unless the config says otherwise."""
        return EnvSettings()

    # --- what subclasses provide ------------------------------------------------------------

    @abc.abstractmethod
    def tasks(self, split: str) -> list[Task]:
        """The fixed, ordered task list of a split."""

    @abc.abstractmethod
    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        """Start `task`; return the first observation (the task statement) and info."""

    @abc.abstractmethod
    def _act(self, action: str | ToolCall) -> Transition:
        """Apply a well-formed action."""

    def expert_actions(self, task: Task) -> list[str] | None:
        """A response sequence that solves `task` (gold path, walkthrough), or None."""
        return None

    def system_prompt(self) -> str:
        """Instructions shown once, before the task (tool schemas or command conventions)."""
        return "You are an agent acting in a text environment. Reply with one command per turn."

    # --- the interface ------------------------------------------------------------------------

    def instructions(self) -> str:
        """The system prompt the agent sees: `system_prompt`, plus the ReAct format if asked."""
        text = self.system_prompt()
        if self.settings.react:
            if self.action_format == "tool_call":
                text += " First think in one or two short sentences, then write the tool call."
            else:
                text += " First think in one short sentence, then write the command on a last line starting with 'Action:'."
        return text

    # --- tools (``action_format = "tool_call"``), written the model's own way -------------------

    def call_example(self) -> str | None:
        """How a tool call is written, for `system_prompt`; None when the chat template presents
        the tools itself (it teaches the syntax too)."""
        return None if self.settings.native_tools else CALL_EXAMPLES[self.settings.tool_syntax]

    def tool_list(self) -> str:
        """``Tools: [schemas as JSON]`` for `system_prompt`; empty when the chat template presents them."""
        return "" if self.settings.native_tools or not self.tools else "Tools: " + json.dumps(self.tools)

    def chat_tools(self) -> list[dict] | None:
        """The tool schemas for the chat template (OpenAI format) when it presents them, else None."""
        native = self.settings.native_tools and self.action_format == "tool_call" and self.tools
        return openai_tools(self.tools) if native else None

    def tool_call_text(self, name: str, **arguments: Any) -> str:
        """A tool call as this run's model writes it (expert demonstrations)."""
        return render_tool_call(ToolCall(name, arguments), self.settings.tool_syntax, self.settings.native_tools)

    def reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        self.task = task
        self.steps_taken = 0
        return self._reset(task)

    def step(self, response: str) -> Transition:
        if self.task is None:
            raise EnvError(f"{self.name}: step() before reset()")
        self.steps_taken += 1
        if self.settings.step_delay_s > 0:
            time.sleep(self.settings.step_delay_s)
        action = self.parse(response)
        if isinstance(action, MalformedAction):
            return Transition(
                observation=f"Invalid action: {action.reason}.",
                reward=self.settings.format_penalty + self.settings.invalid_action_penalty,
                terminated=False,
                truncated=False,
                info={"invalid_action": True, "malformed": True, "anchor": self.anchor()},
            )
        result = self._act(action)
        if result.info.get("invalid_action"):
            result = result._replace(reward=result.reward + self.settings.invalid_action_penalty)
        return result

    def parse(self, response: str) -> str | ToolCall | MalformedAction:
        if self.action_format == "tool_call":
            return parse_tool_call(response, self.tools, self.settings.tool_syntax)
        return parse_command(response)

    def anchor(self) -> str | None:
        """Canonical key of the current environment state (GiGPO), or None."""
        return None

    def render(self, task_text: str, history: list[tuple[str, str]], observation: str) -> str:
        """The whole next user message for ``context="env"`` (a compressed state of the step-level MDP):
        the task, the last few actions with their results, and the current observation.
        Environments with a richer state override this."""
        lines = [task_text]
        if history:
            lines.append("Recent actions:")
            lines += [f"> {a}\n{o}" for a, o in history[-3:]]
        lines.append(f"Now: {observation}")
        return "\n".join(lines)

    def step_and_render(self, response: str, task_text: str, history: list[tuple[str, str]]) -> tuple[Transition, str]:
        """`step`, then `render` the next prompt from the environment's state (``context="env"``);
        one call, so it runs where the environment lives (thread or process)."""
        result = self.step(response)
        return result, self.render(task_text, history, result.observation)

    def close(self) -> None:  # noqa: B027 - optional hook: most environments hold nothing to release
        """Release external resources (a JVM, a game process)."""
