"""What every serving engine implements, and the one place where what an engine cannot do is refused.

An engine (`serve.engine`) runs a loaded model's generations: `hf` (transformers, continuous batching),
`llamacpp` (a GGUF in llama.cpp, behind runner's own server) and `vllm` (vLLM's own server, launched on the merged
model). Each declares the optional request parameters it honours (`supports`, names from `OPTIONAL`); a request
that asks for anything else is refused by `check_supported` with the parameter's name, never ignored."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from runner.serve.text import Pieces

if TYPE_CHECKING:
    from runner.serve.codec import Codec

# the request parameters that change how tokens are chosen, as `Sampling` names them (and the OpenAI API does);
# each is either honoured by an engine or refused
OPTIONAL = (
    "temperature",
    "top_p",
    "seed",
    "stop",
    "logprobs",
    "min_tokens",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "echo",
)


Prompt = str | list[int]  # text (the codec tokenizes it) or token ids (used as they are)


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: greedy unless temperature > 0; `seed` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token to report (0: only the chosen token's); None: none
    min_tokens: int = 0  # the end-of-text token is held off until this many tokens (vLLM's extension)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    echo: bool = False  # the answer starts with the prompt, and its logprobs with the prompt tokens' (vLLM's way)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-4  # a tiny temperature is greedy (dividing logits by 1e-300 overflows)

    def asked(self) -> list[str]:
        """The optional parameters this request sets away from their neutral value."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [name for name in OPTIONAL if getattr(self, name) != defaults[name]]

    def reseeded(self, seed: int) -> Sampling:
        return dataclasses.replace(self, seed=seed)


@dataclass
class Output:
    """One whole answer (with `echo`, the prompt's text and logprobs first)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length
    logprobs: list[dict[str, Any]] | None = None


class NotSupported(ValueError):
    """A request parameter this engine cannot honour (answered 400, never ignored)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Engine(Protocol):
    """A loaded model that answers requests, one generation step at a time on the model thread. Both methods
    refuse (`NotSupported`, through `check_supported`) a request that asks for what the engine does not honour."""

    kind: ClassVar[str]  # its serve.engine name
    supports: ClassVar[frozenset[str]]  # the names in OPTIONAL it honours
    name: str  # the model id clients ask for
    precision: str  # as trained (fp32, bf16, int8, int4) or as quantized (gguf q8_0)
    codec: Codec  # its prompt template and tokenizer

    def generate_all(self, jobs: list[tuple[Prompt, Sampling]]) -> list[Output]:
        """Whole answers to several prompts (text, or token ids taken as they are), in order."""
        ...

    def start(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        """Start the answer to prompt tokens `ids`: each new token id goes to `put` (called on the model thread) as
        it comes, then None, or the exception that ended it. Setting `cancel` frees the model within one token
        step."""
        ...


def check_supported(engine: Engine, s: Sampling) -> None:
    """Refuse a request that asks for what the engine does not do, naming the parameter."""
    for name in s.asked():
        if name not in engine.supports:
            raise NotSupported(f"{name} is not supported by serve.engine {engine.kind}", param=name)


def begin(engine: Engine, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> Pieces:
    """Start an answer (`Engine.start`) and return the `Pieces` that turn its tokens into text."""
    engine.start(ids, s, cancel, put)
    return Pieces(engine.codec.tokenizer, engine.codec.stops + list(s.stop), cancel)


def stream(
    engine: Engine,
    prompt: str,
    s: Sampling,
    cancel: threading.Event | None = None,
    done: dict[str, Any] | None = None,
) -> Generator[str]:
    """Text pieces as they are generated, cut before a stop string; stop iterating and the model is free of it
    within one token step. `done` receives finish_reason and token counts at the end."""
    import queue

    ids = engine.codec.encode(prompt, s.max_tokens)
    tokens: queue.Queue[Any] = queue.Queue()
    pieces = begin(engine, ids, s, cancel or threading.Event(), tokens.put)
    try:
        while not pieces.done:
            if piece := pieces.feed(tokens.get()):
                yield piece
    finally:
        pieces.cancel.set()  # done, stopped or abandoned: nothing more is wanted
        if done is not None:
            done.update(pieces.usage(len(ids), s.max_tokens))


async def astream(
    engine: Engine, ids: list[int], s: Sampling, done: dict[str, Any] | None = None
) -> AsyncGenerator[str]:
    """`stream` for an event loop, from prompt token ids: the tokens come from the model thread straight to the
    loop, so a stream holds no thread while it waits. Cancelled (a client gone, a stop button) or closed, it frees
    the model within one token step."""
    import asyncio

    loop, tokens = asyncio.get_running_loop(), asyncio.Queue[Any]()

    def put(item: Any) -> None:  # on the model thread
        try:
            loop.call_soon_threadsafe(tokens.put_nowait, item)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is reading
            pass

    pieces = begin(engine, ids, s, threading.Event(), put)
    try:
        while not pieces.done:
            if piece := pieces.feed(await tokens.get()):
                yield piece
        if done is not None:
            done.update(pieces.usage(len(ids), s.max_tokens))
    finally:
        pieces.cancel.set()
