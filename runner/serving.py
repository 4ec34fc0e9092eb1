"""Model runtime for serving and terminal chat: a built recipe's model (base + LoRA adapter, or merged),
its tokenizer and prompt template; generation whole or streamed, one request at a time per model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from runner.errors import RunnerError
from runner.params import Params
from runner.steps.prompts import render_prompt

Variant = Literal["tuned", "base", "merged"]


class ServeConfig(Params):
    """How `runner serve` and `runner chat` expose the recipe."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[Variant] = Field(default_factory=lambda: ["tuned"],
                                  description="tuned (base + adapter), base, merged; each is a model id NAME-VARIANT")
    docs: bool = Field(True, description="also serve NAME-VARIANT+docs: answers from the recipe's index, with sources")
    top_k: int = Field(4, ge=1, description="chunks retrieved for document chat")
    max_tokens: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    token_env: str | None = Field(None, description="if set, requests need `Authorization: Bearer $TOKEN_ENV`")
    system: str | None = Field(None, description="system prompt put before every conversation")
    batch_size: int = Field(16, ge=1, description="greedy requests that arrive while one generates are run together, "
                                                  "up to this many (1: one at a time)")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="how long a batch waits for more requests to join")


@dataclass
class Sampling:
    """How to pick tokens: greedy unless temperature > 0; `seed` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token to report (0: only the chosen token's); None: none

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-4  # a tiny temperature is greedy (dividing logits by 1e-300 overflows)


@dataclass
class Output:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length
    logprobs: list[dict[str, Any]] | None = None


class ContextTooLong(ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(f"this model's context is {context} tokens; the prompt has {prompt_tokens} and max_tokens asks "
                         f"for {max_tokens} more ({prompt_tokens + max_tokens} in all). Shorten the prompt or lower "
                         "max_tokens")
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context


@dataclass
class Model:
    """A loaded model, used by one generation at a time (others wait their turn). A generation holds the
    model only while it runs: cancelling it (a client gone, a stop string seen) frees the model within one
    token step."""

    name: str
    template: str
    model: Any
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    precision: str = "fp32"  # the trained precision: int8/int4 models are served quantized
    quantized_layers: int = 0
    batcher: Batcher | None = None  # set by `batching`: greedy whole answers run in batches

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """A conversation (history carried across turns, as h2oGPT does) as the model's prompt text."""
        return render_prompt(self.template, messages, self.tokenizer)

    @property
    def stops(self) -> list[str]:
        return ["<human>:", "<bot>:"] if self.template == "human_bot" else []

    @property
    def context(self) -> int | None:
        """How many positions the model attends to, if it says."""
        cfg = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def encode(self, prompt: str, max_tokens: int) -> Any:
        """Token ids of `prompt` (checked against the context before anything is allocated)."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if not ids:  # an empty prompt: the model starts from its end-of-text token
            ids = [self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0]
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise ContextTooLong(len(ids), max_tokens, self.context)
        return ids

    def _kwargs(self, s: Sampling, cancel: threading.Event) -> dict[str, Any]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                return cancel.is_set()

        kw: dict[str, Any] = {"max_new_tokens": s.max_tokens, "do_sample": not s.greedy,
                              "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id,
                              "stopping_criteria": StoppingCriteriaList([Cancelled()])}
        if not s.greedy:
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        return kw

    def generate(self, prompt: str, s: Sampling, cancel: threading.Event | None = None) -> Output:
        """The whole answer, cut before the first stop string (the template's and `s.stop`)."""
        import torch

        cancel = cancel or threading.Event()
        ids = self.encode(prompt, s.max_tokens)
        if self.batcher is not None and s.greedy and s.seed is None and s.logprobs is None:
            return self.batcher.submit(ids, s)
        enc = torch.tensor([ids])
        with self.lock, torch.no_grad():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            out = self.model.generate(input_ids=enc, attention_mask=torch.ones_like(enc), **self._kwargs(s, cancel),
                                      output_scores=s.logprobs is not None, return_dict_in_generate=True)
        return self.output(ids, out.sequences[0, len(ids):].tolist(), s, out.scores)

    def output(self, ids: list[int], new: list[int], s: Sampling, scores: Any = None) -> Output:
        """An answer from the generated token ids: cut at the end-of-text token and the stop strings."""
        eos = self.tokenizer.eos_token_id
        new = new[: s.max_tokens]
        count = new.index(eos) + 1 if eos in new else len(new)  # generated tokens, the end-of-text one included
        new = new[: count - 1] if eos in new else new
        text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), self.stops + list(s.stop))
        logprobs = self._logprobs(new, scores, s.logprobs) if s.logprobs is not None else None
        finish = "stop" if stopped or count < s.max_tokens else "length"
        return Output(text, len(ids), count, finish, logprobs)

    def _logprobs(self, new: list[int], scores: Any, top: int) -> list[dict[str, Any]]:
        import torch

        out = []
        for token, step in zip(new, scores):
            lp = torch.log_softmax(step[0].float(), dim=-1)
            entry: dict[str, Any] = {"token": self.tokenizer.decode([token]), "logprob": float(lp[token])}
            if top:
                values, idx = torch.topk(lp, top)
                entry["top_logprobs"] = [{"token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                                         for v, i in zip(values, idx)]
            out.append(entry)
        return out

    def stream(self, prompt: str, s: Sampling, cancel: threading.Event | None = None,
               done: dict[str, Any] | None = None) -> Iterator[str]:
        """Text pieces as they are generated, cut before a stop string. The generation runs in its own thread and
        holds the model only while it runs: set `cancel` (or stop iterating and set it) and the model is free
        within one token step. `done` receives finish_reason and token counts at the end."""
        import torch
        from transformers import TextIteratorStreamer

        cancel = cancel or threading.Event()
        ids = self.encode(prompt, s.max_tokens)
        enc = torch.tensor([ids])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        produced: dict[str, int] = {}

        def work() -> None:
            try:
                with self.lock, torch.no_grad():
                    if s.seed is not None:
                        torch.manual_seed(s.seed)
                    out = self.model.generate(input_ids=enc, attention_mask=torch.ones_like(enc),
                                              **self._kwargs(s, cancel), streamer=streamer)
            except BaseException:
                streamer.end()  # the reader must not wait for text that will never come
                raise
            new = out[0, len(ids):].tolist()
            eos = self.tokenizer.eos_token_id
            produced["n"] = new.index(eos) + 1 if eos in new else len(new)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        stops = self.stops + list(s.stop)
        held, stopped = "", False
        try:
            for piece in streamer:
                held += piece
                text, stopped = cut_at_stop(held, stops)
                if stopped:
                    cancel.set()  # the rest is not wanted: free the model now
                    if text:
                        yield text
                    break
                safe = len(held) - max(_partial_stop(held, stops), len(held) - len(held.rstrip()))
                if safe > 0:  # trailing whitespace waits: before a stop string it is cut, as in `generate`
                    yield held[:safe]
                    held = held[safe:]
            else:
                if held:
                    yield held
        finally:
            cancel.set()  # done, stopped or abandoned: nothing more is wanted
            thread.join()
            if done is not None:
                n = produced.get("n", 0)
                done.update({"prompt_tokens": len(ids), "completion_tokens": n,
                             "finish_reason": "stop" if stopped or n < s.max_tokens else "length"})


class Batcher:
    """Dynamic batching for one model: greedy whole-answer requests queue here; a worker takes the first, waits
    up to `wait` seconds for more to arrive (up to `size`), and runs them as one left-padded `generate`. Greedy
    decoding of a padded batch gives each request the tokens it would get alone (up to float rounding)."""

    def __init__(self, model: Model, size: int, wait: float) -> None:
        import queue

        self.model, self.size, self.wait = model, size, wait
        self.largest = 0  # the largest batch run so far
        self.queue: queue.Queue[tuple[list[int], Sampling, Any]] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name=f"batcher-{model.name}").start()

    def submit(self, ids: list[int], s: Sampling) -> Output:
        from concurrent.futures import Future

        future: Future[Output] = Future()
        self.queue.put((ids, s, future))
        return future.result()

    def _loop(self) -> None:
        import queue
        import time

        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.size:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            self.largest = max(self.largest, len(batch))
            try:
                outputs = self._run(batch)
            except BaseException as exc:  # noqa: BLE001 (handed to every waiting request)
                for _, _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, _, future), out in zip(batch, outputs):
                future.set_result(out)

    def _run(self, batch: list[tuple[list[int], Sampling, Any]]) -> list[Output]:
        import torch

        m = self.model
        width = max(len(ids) for ids, _, _ in batch)
        pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in batch])
        most = max(s.max_tokens for _, s, _ in batch)
        with m.lock, torch.no_grad():
            out = m.model.generate(input_ids=input_ids, attention_mask=mask,
                                   **m._kwargs(Sampling(max_tokens=most), threading.Event()))
        return [m.output(ids, out[i, width:].tolist(), s) for i, (ids, s, _) in enumerate(batch)]


def batching(models: dict[str, Model], config: ServeConfig) -> dict[str, Model]:
    """Give each model a batcher (serve.batch_size > 1)."""
    if config.batch_size > 1:
        for model in models.values():
            if model.batcher is None:
                model.batcher = Batcher(model, config.batch_size, config.batch_wait_ms / 1000)
    return models


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut].rstrip(), True) if cut >= 0 else (text, False)


def _partial_stop(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


def load_models(build: Any, variants: list[Variant]) -> dict[str, Model]:
    """The recipe's built model variants, by model id `RECIPE-VARIANT`."""
    from runner import api
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from peft import PeftModel
    from transformers import AutoTokenizer

    from runner.steps.models import base_dir, count_quantized, load_model, use_precision

    r = build.loaded.recipe
    if r.model is None:
        raise RunnerError(f"{build.loaded.path} has no model: section to serve")
    needed = ["tokenizer", "train"] + (["merge"] if "merged" in variants else [])
    arts = {}
    have = api.built(build)
    for step in needed + (["model.init"] if "model.init" in build.graph.nodes else []):
        art = have.get(step)
        if art is None:
            if step == "merge" and step not in build.graph.nodes:
                raise RunnerError(f"{build.loaded.path} has no merge step: add merged to serve.models (or set "
                                  "train.merge: true) and apply")
            raise RunnerError(f"step {step} of {build.loaded.path} is not built: run `runner apply {build.loaded.path}`")
        arts[step] = art
    tok = AutoTokenizer.from_pretrained(arts["tokenizer"].file("tokenizer"))
    tok.padding_side = "left"
    spec = r.model.model_copy(update={"revision": build.graph.nodes["train"].params.commit or r.model.revision})
    built = arts["model.init"].file("model") if "model.init" in arts else None
    precision = use_precision(r.model.precision)
    out = {}
    for variant in variants:
        if variant == "merged":
            model = load_model(arts["merge"].file("model"), precision)
        else:
            model = load_model(base_dir(spec, build.graph.nodes["train"].files, built), precision,
                               trust_remote_code=r.model.trust_remote_code)
        quantized = count_quantized(model)[0] if precision in ("int8", "int4") else 0  # before LoRA wraps layers
        if variant == "tuned":
            model = PeftModel.from_pretrained(model, arts["train"].file("adapter"))
        model.eval()
        name = f"{build.loaded.name}-{variant}"
        out[name] = Model(name, r.data.prompt.template if r.data else "plain", model, tok, precision=precision,
                          quantized_layers=quantized)
    return out
