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
"""

from __future__ import annotations

import jinja2
from transformers import PreTrainedTokenizerBase

from steppo.core.choices import ConfigError

_A, _B, _O, _U, _V, _S, _T = (f"\u2063STEPPO_{k}\u2063" for k in "ABOUVST")
FIX = ("set model.chat_template=PATH (a Jinja chat template file whose turns can be appended) "
       "or model.chat_template=chatml")


class ChatFormat:
    """Token-level chat turns for one tokenizer.

    Attributes:
        end_of_turn_id: the token that closes an assistant turn (a stop token for generation).
        stop_ids: the ids that end a response: the end-of-turn token and the tokenizer's eos.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
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

    def _refuse(self, why: str):
        raise ConfigError(f"this chat template cannot be extended turn by turn: {why}; {FIX}")

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _messages(self, system: str | None, user: str) -> list[dict]:
        if system and not self._system_role:
            return [{"role": "user", "content": f"{system}\n\n{user}"}]
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def _probe(self, head: list[dict], marker: str, content: str | None = None, observation: str = _O) -> str:
        """The text after the last assistant message's content (`marker`) in a rendering of `head`,
        that message and a new user message `observation`, with the generation prompt."""
        if head and head[0]["role"] == "system" and not self._system_role:
            head = self._messages(head[0]["content"], head[1]["content"]) + head[2:]
        messages = head + [{"role": "assistant", "content": content or marker},
                           {"role": "user", "content": observation}]
        try:
            text = self._render(messages, add_generation_prompt=True)
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

    def initial_prompt(self, system: str | None, user: str) -> list[int]:
        """Ids of [system], user, then the assistant generation prompt."""
        return self.encode(self._render(self._messages(system, user), add_generation_prompt=True))

    def observation_ids(self, observation: str, response_closed: bool) -> list[int]:
        """Ids to append after a response: the template's new user turn holding the observation and
        the next generation prompt, with its end-of-turn token first unless the response closed with
        it already."""
        delta = self._probe([{"role": "user", "content": _U}], _A, observation=observation)
        ids = self.encode(delta)
        return ids[1:] if response_closed and ids[:1] == [self.end_of_turn_id] else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
