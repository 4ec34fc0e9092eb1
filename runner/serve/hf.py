"""`serve.engine: transformers`: a built recipe's model in transformers (base + LoRA adapter, or merged), whole
answers and streams, in continuous batches where the batcher can take them (seeded and logprobs requests run
alone, as `generate` runs them)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from runner.serve.codec import Codec
from runner.serve.engine import Output, Prompt, Sampling, check_supported
from runner.serve.text import has_stop
from runner.serve.thread import on_model_thread, run_alone

if TYPE_CHECKING:
    from runner.serve.batcher import Batcher


@dataclass
class TransformersEngine:
    """A loaded transformers model, used by one generation (or one batch step) at a time. A generation holds the
    model only while it runs: cancelling it (a client gone, a stop string seen) frees the model within one token
    step."""

    kind: ClassVar[str] = "transformers"
    supports: ClassVar[frozenset[str]] = frozenset(
        {"temperature", "top_p", "seed", "stop", "logprobs", "min_tokens", "echo"}
    )

    name: str
    codec: Codec
    model: Any  # the torch module (a PeftModel for the tuned variant)
    precision: str = "fp32"  # the trained precision: int8/int4 models are served quantized
    quantized_layers: int = 0
    batcher: Batcher | None = None  # set by `attach_batcher`
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach_batcher(self, size: int, wait: float) -> None:
        """Run requests in continuous batches of up to `size` (see `uses_batcher`)."""
        from runner.serve.batcher import Batcher

        self.batcher = Batcher(self, size, wait)

    def uses_batcher(self, s: Sampling) -> bool:
        """Whether a request runs in the batcher: greedy or sampled; seeded ones run alone (their seed repeats the
        draws of `generate` alone, whatever else is in flight), and so do logprobs and echo ones."""
        return self.batcher is not None and s.seed is None and s.logprobs is None and not s.echo

    def generate(self, prompt: Prompt, s: Sampling, cancel: threading.Event | None = None) -> Output:
        """The whole answer, cut before the first stop string (the template's and `s.stop`); with `s.echo`, the
        prompt first (its text, and its tokens' logprobs when asked)."""
        ids = self.codec.encode(prompt, s.max_tokens)
        if self.batcher is not None and self.uses_batcher(s):
            return self.batcher.submit([(ids, s)])[0]
        cancel = cancel or threading.Event()
        scores = s.logprobs is not None
        if s.max_tokens == 0:
            out = Output("", len(ids), 0, "length", [] if scores else None)
        else:
            gen = on_model_thread(
                lambda: self._generate(ids, s, cancel, output_scores=scores, return_dict_in_generate=True)
            )
            new = gen.sequences[0, len(ids) :].tolist()
            out = self.codec.output(ids, new, s, self._logprobs(new, gen.scores, s.logprobs) if scores else None)
        if not s.echo:
            return out
        echoed = on_model_thread(self._prompt_logprobs, ids, s.logprobs or 0) if scores else None
        logprobs = None if out.logprobs is None or echoed is None else echoed + out.logprobs
        return Output(
            self.codec.decode(ids) + out.text, out.prompt_tokens, out.completion_tokens, out.finish_reason, logprobs
        )

    def generate_all(self, jobs: list[tuple[Prompt, Sampling]]) -> list[Output]:
        """Whole answers to several prompts, in order. When the batcher takes them all they join it together, so
        they share its token steps; otherwise they run one after another."""
        for _, s in jobs:
            check_supported(self, s)
        if self.batcher is not None and all(self.uses_batcher(s) for _, s in jobs):
            return self.batcher.submit([(self.codec.encode(p, s.max_tokens), s) for p, s in jobs])
        return [self.generate(p, s) for p, s in jobs]

    def start(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        """Start an answer, in the batcher or alone (see `Engine.start`)."""
        check_supported(self, s)
        if self.batcher is not None and self.uses_batcher(s):
            self.batcher.add(ids, s, cancel, put)
            return
        from transformers.generation.streamers import BaseStreamer

        class Tokens(BaseStreamer):
            """generate() hands it the prompt, then each new token: the new ones go to `emit`."""

            def __init__(self, emit: Callable[[int], None]) -> None:
                self.emit, self.prompt = emit, True

            def put(self, value: Any) -> None:
                if self.prompt:
                    self.prompt = False
                    return
                for token in value.reshape(-1).tolist():
                    self.emit(token)

            def end(self) -> None:
                pass

        run_alone(lambda emit: self._generate(ids, s, cancel, streamer=Tokens(emit)), put)

    def generate_kwargs(self, s: Sampling, cancel: threading.Event, start: int) -> dict[str, Any]:
        """generate()'s arguments for one request whose prompt is `start` tokens long."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        stops, decode = self.codec.stops + list(s.stop), self.codec.decode

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                # cancelled, or a stop string in the answer: nothing more is wanted (as the batcher decides)
                return cancel.is_set() or has_stop(decode(input_ids[0, start:][-16:].tolist()), stops)

        tokenizer = self.codec.tokenizer
        kw: dict[str, Any] = {
            "max_new_tokens": s.max_tokens,
            "do_sample": not s.greedy,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": sorted(self.codec.ends),
            "stopping_criteria": StoppingCriteriaList([Cancelled()]),
        }
        if not s.greedy:
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        if s.min_tokens:
            kw["min_new_tokens"] = s.min_tokens
        return kw

    def _generate(self, ids: list[int], s: Sampling, cancel: threading.Event, **extra: Any) -> Any:
        """transformers' `generate` for one request alone, holding the model (seeded first if asked), in inference
        mode; `extra` goes to `generate`."""
        import torch

        enc = torch.tensor([ids])
        with self.lock, torch.inference_mode():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            return self.model.generate(
                input_ids=enc, attention_mask=torch.ones_like(enc), **self.generate_kwargs(s, cancel, len(ids)), **extra
            )

    def _logprobs(self, new: list[int], scores: Any, top: int | None) -> list[dict[str, Any]]:
        """The generated tokens' log-probabilities (and the `top` likeliest alternatives of each)."""
        return [self._entry(token, step[0], top) for token, step in zip(new, scores, strict=False)]

    def _prompt_logprobs(self, ids: list[int], top: int) -> list[dict[str, Any]]:
        """Each prompt token's log-probability given the tokens before it, from one forward pass (the first token
        has none, as vLLM reports it)."""
        import torch

        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        first = {"token": self.codec.tokenizer.decode([ids[0]]), "logprob": None, "top_logprobs": None}
        return [first] + [self._entry(token, logits[i], top) for i, token in enumerate(ids[1:])]

    def _entry(self, token: int, logits: Any, top: int | None) -> dict[str, Any]:
        import torch

        decode = self.codec.tokenizer.decode
        lp = torch.log_softmax(logits.float(), dim=-1)
        entry: dict[str, Any] = {"token": decode([token]), "logprob": float(lp[token])}
        if top:
            values, idx = torch.topk(lp, top)
            entry["top_logprobs"] = [
                {"token": decode([int(i)]), "logprob": float(v)} for v, i in zip(values, idx, strict=True)
            ]
        return entry


def context_of(model: Any) -> int | None:
    """How many positions a transformers model attends to, if its config says."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
