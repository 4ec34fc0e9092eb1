"""`serve.engine: llama_cpp`: the package's GGUF run by llama.cpp (llama-cpp-python's Python API) behind
runner's own server, so auth, limits, the OpenAI surface and error shapes are the built-in engine's.

Prompts are rendered and counted with the recipe's tokenizer (the package's `gguf` check holds llama.cpp's
tokenizer equal to it), token ids go to llama.cpp, and the answer is cut and counted as the built-in engine
does (`Model.output`). One generation at a time, on the server's one model thread (llama.cpp's CPU threads are
an OpenMP team per calling thread, as torch's are: 4 clients generating on their own threads in turn got
0.13-0.22x one client's tokens/s, on one thread 1.0-1.1x); a stream stops within one token of a cancel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.serving import Model, NotSupported, Output, Sampling, on_model_thread


@dataclass
class LlamaCppModel(Model):
    batchable: bool = False

    @property
    def context(self) -> int | None:
        return int(self.model.n_ctx())

    def _tokens(self, ids: list[int], s: Sampling) -> Iterator[int]:
        """llama.cpp's next tokens after `ids` (greedy, or sampled with temperature/top_p/seed)."""
        import llama_cpp

        if s.logprobs is not None:
            raise NotSupported("logprobs are not available from serve.engine llama_cpp; use the transformers engine")
        if s.seed is not None:
            self.model.set_seed(s.seed % 2**32)
        eos = self.tokenizer.eos_token_id
        count = [0]

        def hold_eos(_: Any, logits: Any) -> Any:  # min_tokens: no end-of-text before then
            if eos is not None and count[0] < s.min_tokens:
                logits[eos] = -float("inf")
            return logits

        processors = llama_cpp.LogitsProcessorList([hold_eos]) if s.min_tokens else None
        kw = {"top_k": 1, "temp": 0.0} if s.greedy else {"top_k": 0, "top_p": s.top_p, "temp": s.temperature}
        for token in self.model.generate(ids, reset=True, logits_processor=processors, **kw):
            count[0] += 1
            yield int(token)

    def _run(self, ids: list[int], s: Sampling, cancel: threading.Event, emit: Any = None) -> list[int]:
        new: list[int] = []
        with self.lock:
            for token in self._tokens(ids, s):
                new.append(token)
                if emit is not None:
                    emit(token)
                if self.ended(new, s, cancel):
                    break
        return new

    def generate(self, prompt: str, s: Sampling, cancel: threading.Event | None = None) -> Output:
        ids = self.encode(prompt, s.max_tokens)
        return self.output(ids, on_model_thread(self._run, ids, s, cancel or threading.Event()), s)

    def _alone(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        self.alone(lambda emit: self._run(ids, s, cancel, emit), put)


def load(name: str, gguf: Path, tokenizer_dir: Path, template: str, *, n_ctx: int) -> LlamaCppModel:
    """A GGUF file as a served model (llama.cpp on all cores, `n_ctx` positions)."""
    import os

    from transformers import AutoTokenizer

    from runner.steps.quiet import llama_cpp_quiet

    llama_cpp = llama_cpp_quiet()
    if llama_cpp is None:
        from runner.errors import RunnerError

        raise RunnerError("serve.engine llama_cpp needs llama-cpp-python: pip install 'runner[gguf]'")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, verbose=False)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    precision = gguf.stem.removeprefix("model-")
    return LlamaCppModel(name, template, llm, tok, precision=f"gguf {precision}")
