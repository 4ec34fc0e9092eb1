"""`serve.engine: llama_cpp`: the package's GGUF run by llama.cpp (llama-cpp-python's Python API) behind runner's
own server, so auth, limits, the OpenAI surface and error shapes are the transformers engine's.

Prompts are rendered and counted with the recipe's tokenizer (the package's `gguf` check holds llama.cpp's
tokenizer equal to it), token ids go to llama.cpp, and the answer is cut and counted as the transformers engine
does (`Codec.output`). One generation at a time, on the server's one model thread (llama.cpp's CPU threads are an
OpenMP team per calling thread, as torch's are); a stream stops within one token of a cancel."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from runner.serve.codec import Codec
from runner.serve.engine import Output, Prompt, Sampling, check_supported
from runner.serve.thread import on_model_thread, run_alone


@dataclass
class LlamaCppEngine:
    """A GGUF in llama.cpp: one generation at a time, never batched."""

    kind: ClassVar[str] = "llama_cpp"
    supports: ClassVar[frozenset[str]] = frozenset({"temperature", "top_p", "seed", "stop", "min_tokens"})

    name: str
    codec: Codec
    llm: Any  # llama_cpp.Llama
    precision: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    def generate_all(self, jobs: list[tuple[Prompt, Sampling]]) -> list[Output]:
        """Whole answers, one after another."""
        for _, s in jobs:
            check_supported(self, s)
        out = []
        for prompt, s in jobs:
            ids = self.codec.encode(prompt, s.max_tokens)
            out.append(self.codec.output(ids, on_model_thread(self._run, ids, s, threading.Event()), s))
        return out

    def start(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        check_supported(self, s)
        run_alone(lambda emit: self._run(ids, s, cancel, emit), put)

    def _run(
        self, ids: list[int], s: Sampling, cancel: threading.Event, emit: Callable[[int], None] | None = None
    ) -> list[int]:
        new: list[int] = []
        with self.lock:
            for token in self._tokens(ids, s):
                new.append(token)
                if emit is not None:
                    emit(token)
                if self.codec.ended(new, s, cancel):
                    break
        return new

    def _tokens(self, ids: list[int], s: Sampling) -> Iterator[int]:
        """llama.cpp's next tokens after `ids` (greedy, or sampled with temperature/top_p/seed)."""
        import llama_cpp

        if s.seed is not None:
            self.llm.set_seed(s.seed % 2**32)
        eos = self.codec.tokenizer.eos_token_id
        count = [0]

        def hold_eos(_: Any, logits: Any) -> Any:  # min_tokens: no end-of-text before then
            if eos is not None and count[0] < s.min_tokens:
                logits[eos] = -float("inf")
            return logits

        processors = llama_cpp.LogitsProcessorList([hold_eos]) if s.min_tokens else None
        kw = {"top_k": 1, "temp": 0.0} if s.greedy else {"top_k": 0, "top_p": s.top_p, "temp": s.temperature}
        for token in self.llm.generate(ids, reset=True, logits_processor=processors, **kw):
            count[0] += 1
            yield int(token)


def load(name: str, gguf: Path, tokenizer_dir: Path, template: str, *, n_ctx: int) -> LlamaCppEngine:
    """A GGUF file as a served model (llama.cpp on all cores, `n_ctx` positions)."""
    import os

    from transformers import AutoTokenizer

    from runner.errors import RunnerError
    from runner.steps.quiet import llama_cpp_quiet

    llama_cpp = llama_cpp_quiet()
    if llama_cpp is None:
        raise RunnerError("serve.engine llama_cpp needs llama-cpp-python: pip install 'runner[gguf]'")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, verbose=False)
    codec = Codec(template, AutoTokenizer.from_pretrained(tokenizer_dir), context=int(llm.n_ctx()))
    return LlamaCppEngine(name, codec, llm, precision=f"gguf {gguf.stem.removeprefix('model-')}")
