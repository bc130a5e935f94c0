"""Chat formatting as token ids, rendered once and then only extended.

The first prompt of an episode goes through the tokenizer's chat template. After that, a
cumulative context grows by appending ids: the response exactly as sampled, then the ids of
the next user turn (the observation) encoded on their own. History is never re-rendered or
re-tokenised, so step t+1's prompt starts with step t's exact prompt + response ids.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_SENTINEL = "\u2063STEPPO\u2063"


class ChatFormat:
    """Token-level chat turns for one tokenizer.

    Attributes:
        end_of_turn_id: the token that closes an assistant turn (a stop token for generation).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template")
        self.tokenizer = tokenizer
        prefix = self._render(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        )
        full = self._render(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": _SENTINEL},
                {"role": "user", "content": _SENTINEL},
            ],
            add_generation_prompt=True,
        )
        user_turn = full[len(prefix):]
        if not full.startswith(prefix) or _SENTINEL not in prefix or _SENTINEL not in user_turn:
            raise ValueError(
                "this chat template re-renders earlier turns; StepPO needs an append-only template"
            )
        # What follows an assistant message, e.g. "<|im_end|>\n" for ChatML.
        self._after_assistant = prefix.split(_SENTINEL, 1)[1]
        self._user_before, self._user_after = user_turn.split(_SENTINEL, 1)
        eot = tokenizer.eos_token
        if eot is None or not self._after_assistant.startswith(eot):
            raise ValueError(
                f"the template closes assistant turns with {self._after_assistant!r}, which does "
                f"not start with the tokenizer's eos token {eot!r}; set eos_token to the end-of-turn token"
            )
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(eot)
        self._eot_text = eot

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def initial_prompt(self, system: str | None, user: str) -> list[int]:
        """Ids of [system], user, then the assistant generation prompt."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        return self.encode(self._render(messages, add_generation_prompt=True))

    def observation_ids(self, observation: str, response_closed: bool) -> list[int]:
        """Ids to append after a response: close the turn if the response was cut before its
        end-of-turn token, then the user turn holding the observation and the next generation
        prompt."""
        closing = self._after_assistant[len(self._eot_text):] if response_closed else self._after_assistant
        return self.encode(closing + self._user_before + observation + self._user_after)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
