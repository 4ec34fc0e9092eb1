"""From token ids to an answer's text: decoding (incrementally when streaming) and cutting at stop strings."""

from __future__ import annotations

import threading
from typing import Any


class Pieces:
    """An answer's text as its token ids come, in pieces to send. `feed(token)` gives what may go out now: a
    character split across tokens waits for the rest, and so does what may begin a stop string (with whitespace
    before it, which `generate` cuts too). Joined, the pieces are the whole answer's text: `tokenizer.decode(ids,
    skip_special_tokens=True)` (a character the answer ends inside of as U+FFFD, the way decode shows it) cut
    before the first stop string. When a stop string is seen or the answer ends, `done` is set and so is
    `cancel`: nothing more is wanted."""

    def __init__(self, tokenizer: Any, stops: list[str], cancel: threading.Event) -> None:
        self.tokenizer, self.stops, self.cancel = tokenizer, stops, cancel
        self.backend, self.stream = _backend(tokenizer), None
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []  # the tokens fed
        self.length = 0  # characters of their decoded text taken so far
        self.held = ""  # taken, not yet let out
        self.stopped = self.done = False

    def feed(self, item: int | BaseException | None) -> str:
        """What may go out now that `item` came: a new token id, None for the end, or an exception (raised)."""
        if isinstance(item, BaseException):
            self.cancel.set()
            raise item
        if item is None:
            self.done = True
            return self._out(decode(self.tokenizer, self.ids)[self.length :])
        self.ids.append(item)
        if self.stream is not None:  # incremental, in Rust: one token's work per token
            piece = self.stream.step(self.backend, item) or ""
        else:  # spaces cleaned up after decoding can change text already decoded ("do n" becomes "don't" a
            # token later): whole lines, which the clean-up's rules never reach across
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            piece = text[self.length : text.rfind("\n") + 1]
        self.length += len(piece)
        return self._out(piece)

    def _out(self, piece: str) -> str:
        held = self.held + piece
        text, self.stopped = cut_at_stop(held, self.stops)
        if self.stopped or self.done:
            self.held, self.done = "", True
            self.cancel.set()
            return text
        safe = len(held) - partial_stop(held, self.stops)
        if self.stops:  # whitespace before a stop string is cut with it: it waits too
            safe = len(held[:safe].rstrip())
        self.held = held[safe:]
        return held[:safe]

    def usage(self, prompt_tokens: int, max_tokens: int) -> dict[str, Any]:
        """Token counts and finish_reason, as a whole answer's `Output` gives them."""
        n = len(self.ids)
        finish = "stop" if self.stopped or n < max_tokens else "length"
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "finish_reason": finish}


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers` tokenizer whose decode is `tokenizer.decode`'s, when there is one: a fast tokenizer that
    does not clean up spaces after decoding. As transformers decides, a BPE tokenizer's clean-up is ignored unless
    forced."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cleans = getattr(tokenizer, "clean_up_tokenization_spaces", False) and (
        backend is None
        or type(backend.model).__name__ != "BPE"
        or getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )
    return None if cleans else backend


def decode(tokenizer: Any, ids: list[int]) -> str:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, through the tokenizers backend where that gives the same
    text (transformers' wrapper around it costs more than the decode, at every token step)."""
    return str((_backend(tokenizer) or tokenizer).decode(ids, skip_special_tokens=True))


def has_stop(tail: str, stops: list[str]) -> bool:
    """Whether the last tokens of an answer (decoded) hold a stop string: generation ends there."""
    return any(x in tail for x in stops)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string (and the whitespace before it), and whether one was there."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut].rstrip(), True) if cut >= 0 else (text, False)


def partial_stop(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
