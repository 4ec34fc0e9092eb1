"""`serve.engine: llama_cpp`: the package's GGUF run by llama.cpp (llama-cpp-python's Python API) behind runner's
own server, so auth, limits, the OpenAI surface and error shapes are the transformers engine's.

Prompts are rendered and counted with the recipe's tokenizer (the package's `gguf` check holds llama.cpp's
tokenizer equal to it), token ids go to llama.cpp, and the answer is cut and counted as the transformers engine
does (`Codec.output`). Everything runs on the server's one model thread (llama.cpp's CPU threads are an OpenMP
team per calling thread, as torch's are); a stream stops within one token of a cancel.

With `serve.batch_size` > 1, greedy and unseeded sampled requests run in continuous batches (`SequenceBatcher`):
each request is a sequence of one llama.cpp context (`n_seq_max` sequences over a unified KV cache), prompts are
prefilled and every sequence's next token decoded in one `llama_decode` per step, as llama.cpp's own server does
with `--parallel`. Seeded requests run alone, with llama.cpp's sampler."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from runner.serve.batcher import Batcher, Request
from runner.serve.codec import Codec, end_ids
from runner.serve.engine import Output, Prompt, Sampling, check_supported
from runner.serve.thread import on_model_thread, run_alone


@dataclass
class LlamaCppEngine:
    """A GGUF in llama.cpp: requests in continuous batches (`attach_batcher`), or one at a time."""

    kind: ClassVar[str] = "llama_cpp"
    supports: ClassVar[frozenset[str]] = frozenset({"temperature", "top_p", "seed", "stop", "min_tokens"})

    name: str
    codec: Codec
    llm: Any  # llama_cpp.Llama
    precision: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    batcher: SequenceBatcher | None = None

    def attach_batcher(self, size: int, wait: float) -> None:
        """Run greedy and unseeded sampled requests in continuous batches of up to `size` sequences."""
        self.batcher = SequenceBatcher(self, size, wait)

    def uses_batcher(self, s: Sampling) -> bool:
        return self.batcher is not None and s.seed is None

    def generate_all(self, jobs: list[tuple[Prompt, Sampling]]) -> list[Output]:
        """Whole answers: together in the batcher when it takes them all, else one after another."""
        for _, s in jobs:
            check_supported(self, s)
        encoded = [(self.codec.encode(prompt, s.max_tokens), s) for prompt, s in jobs]
        if self.batcher is not None and all(self.uses_batcher(s) for _, s in jobs):
            return self.batcher.submit(encoded)
        return [self.codec.output(ids, on_model_thread(self._run, ids, s, threading.Event()), s) for ids, s in encoded]

    def start(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        check_supported(self, s)
        if self.batcher is not None and self.uses_batcher(s):
            self.batcher.add(ids, s, cancel, put)
            return
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
        ends = sorted(self.codec.ends)
        count = [0]

        def hold_eos(_: Any, logits: Any) -> Any:  # min_tokens: no end token before then
            if count[0] < s.min_tokens:
                logits[ends] = -float("inf")
            return logits

        processors = llama_cpp.LogitsProcessorList([hold_eos]) if s.min_tokens else None
        kw = {"top_k": 1, "temp": 0.0} if s.greedy else {"top_k": 0, "top_p": s.top_p, "temp": s.temperature}
        for token in self.llm.generate(ids, reset=True, logits_processor=processors, **kw):
            count[0] += 1
            yield int(token)


class SequenceBatcher(Batcher):
    """Continuous batching over one llama.cpp context: a request is a sequence (its own id, positions from 0,
    cells in the unified KV cache), so each gets the logits it would get alone. A step is one `llama_decode` of
    every newcomer's prompt (in chunks of at most `n_batch` tokens) and every running sequence's last token."""

    def __init__(self, engine: LlamaCppEngine, size: int, wait: float) -> None:
        import llama_cpp

        super().__init__(engine, size, wait)  # type: ignore[arg-type]
        llm = engine.llm
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = int(llm.n_ctx()) * size  # every sequence may use the whole context, as when alone
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = size
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = llm.n_threads
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {size} sequences")
        self.n_batch = int(params.n_batch)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model)))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.free = list(range(size))  # sequence ids not in use
        self.seq: dict[int, int] = {}  # id(request) -> its sequence id

    def _inference(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> list[Any]:
        """Decode (token, position, sequence, wants logits) in chunks of `n_batch`; the logits asked for, in order."""
        import llama_cpp
        import numpy as np
        import torch

        out = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            b = self.batch
            for i, (token, pos, seq, logits) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
                b.seq_id[i][0] = seq
            b.n_tokens = len(chunk)
            with self.engine.lock:
                if llama_cpp.llama_decode(self.ctx, b) != 0:
                    raise RuntimeError("llama.cpp could not decode the batch (is the KV cache full?)")
                for i, (*_, logits) in enumerate(chunk):
                    if logits:
                        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                        out.append(torch.from_numpy(row.copy()))
        return out

    def _join(self, fresh: list[Request]) -> None:
        tokens = []
        for r in fresh:
            seq = self.seq[id(r)] = self.free.pop()
            tokens += [(t, pos, seq, pos == len(r.ids) - 1) for pos, t in enumerate(r.ids)]
        self._pick(self._decode(tokens), fresh)

    def _step(self, active: list[Request]) -> None:
        tokens = [(r.new[-1], len(r.ids) + len(r.new) - 1, self.seq[id(r)], True) for r in active]
        self._pick(self._decode(tokens), active)

    def _keep(self, active: list[Request], keep: list[int]) -> None:
        """Free the cells of the sequences that finished."""
        import llama_cpp

        memory = llama_cpp.llama_get_memory(self.ctx)
        for i, r in enumerate(active):
            if i not in keep:
                seq = self.seq.pop(id(r))
                llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
                self.free.append(seq)

    def _reset(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.free += list(self.seq.values())
        self.seq.clear()


def load(name: str, gguf: Path, tokenizer_dir: Path, template: str, *, n_ctx: int) -> LlamaCppEngine:
    """A GGUF file as a served model (llama.cpp on all cores, `n_ctx` positions)."""
    import os

    from transformers import AutoTokenizer, GenerationConfig

    from runner.errors import RunnerError
    from runner.steps.quiet import llama_cpp_quiet

    llama_cpp = llama_cpp_quiet()
    if llama_cpp is None:
        raise RunnerError("serve.engine llama_cpp needs llama-cpp-python: pip install 'runner[gguf]'")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, verbose=False)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    try:
        declared = GenerationConfig.from_pretrained(tokenizer_dir)
    except OSError:  # no generation_config.json: the tokenizer's end-of-text alone
        declared = None
    codec = Codec(template, tok, context=int(llm.n_ctx()), ends=end_ids(tok, declared))
    return LlamaCppEngine(name, codec, llm, precision=f"gguf {gguf.stem.removeprefix('model-')}")
