"""A served model's text side, whatever engine runs it: the prompt template, the tokenizer, the context check and
when an answer is over."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from runner.serve.engine import Output, Prompt, Sampling
from runner.serve.text import cut_at_stop, decode, has_stop
from runner.steps.prompts import render_prompt


class ContextTooLong(ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(
            f"this model's context is {context} tokens; the prompt has {prompt_tokens} and max_tokens asks "
            f"for {max_tokens} more ({prompt_tokens + max_tokens} in all). Shorten the prompt or lower "
            "max_tokens"
        )
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context


class BadTokens(ValueError):
    """Prompt token ids the model does not have."""


def end_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """Every token that ends an answer: the tokenizer's end-of-text and each one the model's generation config
    declares (Llama 3 declares three: end of text, of a message, of a tool call)."""
    declared = getattr(generation_config, "eos_token_id", None)
    ids = declared if isinstance(declared, list) else [declared]
    return frozenset(i for i in [getattr(tokenizer, "eos_token_id", None), *ids] if i is not None)


@dataclass
class Codec:
    """Prompts in, answers out, for one model: `template` is the recipe's prompt template, `context` the positions
    the model attends to (None: it does not say), `ends` the tokens that end an answer (default: the tokenizer's
    end-of-text; `end_ids` adds the model's own)."""

    template: str
    tokenizer: Any
    context: int | None = None
    ends: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self.ends = self.ends or end_ids(self.tokenizer)

    def prompt(self, messages: list[dict[str, Any]], tools: str | None = None) -> str:
        """A conversation (history carried across turns, as h2oGPT does) as the model's prompt text; `tools`: the
        JSON list of tool schemas a chat template is given."""
        return render_prompt(self.template, messages, self.tokenizer, tools)

    @property
    def stops(self) -> list[str]:
        """The template's own stop strings."""
        return ["<human>:", "<bot>:"] if self.template == "human_bot" else []

    def encode(self, prompt: Prompt, max_tokens: int) -> list[int]:
        """Token ids of `prompt`, text or ids (checked against the vocabulary and the context before anything is
        allocated)."""
        if isinstance(prompt, list):
            ids = prompt
            vocab = len(self.tokenizer)
            if bad := [i for i in ids if not 0 <= i < vocab]:
                raise BadTokens(f"token id {bad[0]} is not in this model's vocabulary (0 to {vocab - 1})")
        else:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if not ids:  # an empty prompt: the model starts from its end-of-text token
            ids = [self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0]
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise ContextTooLong(len(ids), max_tokens, self.context)
        return ids

    def decode(self, ids: list[int]) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=True)`, the cheap way."""
        return decode(self.tokenizer, ids)

    def ended(self, new: list[int], s: Sampling, cancel: threading.Event | None = None) -> bool:
        """Whether an answer of tokens `new` is over: end-of-text, max_tokens, cancelled, or a stop string in its
        last tokens."""
        if new[-1] in self.ends or len(new) >= s.max_tokens or (cancel is not None and cancel.is_set()):
            return True
        return has_stop(self.decode(new[-16:]), self.stops + list(s.stop))

    def output(
        self, ids: list[int], new: list[int], s: Sampling, logprobs: list[dict[str, Any]] | None = None
    ) -> Output:
        """An answer from the generated token ids: cut at the first end token and the stop strings."""
        new = new[: s.max_tokens]
        end = next((i for i, t in enumerate(new) if t in self.ends), None)
        count = len(new) if end is None else end + 1  # generated tokens, the end token included
        new = new if end is None else new[:end]
        text, stopped = cut_at_stop(self.decode(new), self.stops + list(s.stop))
        finish = "stop" if stopped or count < s.max_tokens else "length"
        return Output(text, len(ids), count, finish, logprobs[:count] if logprobs is not None else None)
