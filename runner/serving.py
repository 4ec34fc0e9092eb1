"""Model runtime for serving and terminal chat: a built recipe's model (base + LoRA adapter, or merged),
its tokenizer and prompt template; generation whole or streamed, in continuous batches (seeded and logprobs
requests alone)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runner.steps.prompts import render_prompt

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from runner.schema import ServeConfig

_model_thread: ThreadPoolExecutor | None = None
_model_thread_lock = threading.Lock()


def model_thread() -> ThreadPoolExecutor:
    """The process's one thread for model work (an executor with one worker). torch's CPU kernels run on an
    OpenMP team per calling thread: generating on a new thread per request, or on several threads in turn, was
    measured 1.3x-2.3x slower than on one thread on 2 cores, so every generation (whole, streamed, batched)
    runs here, one job at a time."""
    global _model_thread
    with _model_thread_lock:
        if _model_thread is None:
            from concurrent.futures import ThreadPoolExecutor

            _model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-model")
        return _model_thread


def on_model_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` run on the model thread (directly when already there); its result or its exception."""
    if _is_model_thread():
        return fn(*args)
    return model_thread().submit(fn, *args).result()


def _is_model_thread() -> bool:
    return threading.current_thread().name.startswith("runner-model")


@dataclass
class Sampling:
    """How to pick tokens: greedy unless temperature > 0; `seed` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token to report (0: only the chosen token's); None: none
    min_tokens: int = 0  # the end-of-text token is held off until this many tokens (vLLM's extension)

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


class NotSupported(ValueError):
    """A request parameter this engine cannot honour (answered 400, never ignored)."""


class ContextTooLong(ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(
            f"this model's context is {context} tokens; the prompt has {prompt_tokens} and max_tokens asks "
            f"for {max_tokens} more ({prompt_tokens + max_tokens} in all). Shorten the prompt or lower "
            "max_tokens"
        )
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
    batcher: Batcher | None = None  # set by `batching`: requests run in continuous batches (see `batched`)
    batchable: bool = True  # whether `batching` may give it a batcher

    def batched(self, s: Sampling) -> bool:
        """Whether a request runs in the batcher: greedy or sampled; seeded ones run alone (their seed repeats the
        draws of `generate` alone, whatever else is in flight), and so do logprobs ones."""
        return self.batcher is not None and s.seed is None and s.logprobs is None

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

    def ended(self, new: list[int], s: Sampling, cancel: threading.Event | None = None) -> bool:
        """Whether an answer of tokens `new` is over: end-of-text, max_tokens, cancelled, or a stop string in its
        last tokens (the batcher and the llama.cpp engine decide with this)."""
        if (
            new[-1] == self.tokenizer.eos_token_id
            or len(new) >= s.max_tokens
            or (cancel is not None and cancel.is_set())
        ):
            return True
        return stopped(self.decode(new[-16:]), self.stops + list(s.stop))

    def decode(self, ids: list[int]) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=True)`, the cheap way (`_decode`)."""
        return _decode(self.tokenizer, ids)

    def _kwargs(self, s: Sampling, cancel: threading.Event, start: int) -> dict[str, Any]:
        """generate()'s arguments for one request whose prompt is `start` tokens long."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        stops, decode = self.stops + list(s.stop), self.decode

        class Cancelled(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                # cancelled, or a stop string in the answer: nothing more is wanted (as the batcher decides)
                return cancel.is_set() or stopped(decode(input_ids[0, start:][-16:].tolist()), stops)

        kw: dict[str, Any] = {
            "max_new_tokens": s.max_tokens,
            "do_sample": not s.greedy,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            "stopping_criteria": StoppingCriteriaList([Cancelled()]),
        }
        if not s.greedy:
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        if s.min_tokens:
            kw["min_new_tokens"] = s.min_tokens
        return kw

    def generate(self, prompt: str, s: Sampling, cancel: threading.Event | None = None) -> Output:
        """The whole answer, cut before the first stop string (the template's and `s.stop`)."""
        cancel = cancel or threading.Event()
        ids = self.encode(prompt, s.max_tokens)
        if self.batched(s):
            return self.batcher.submit([(ids, s)])[0]
        scores = s.logprobs is not None
        out = on_model_thread(
            lambda: self._generate(ids, s, cancel, output_scores=scores, return_dict_in_generate=True)
        )
        return self.output(ids, out.sequences[0, len(ids) :].tolist(), s, out.scores)

    def generate_all(self, jobs: list[tuple[str, Sampling]]) -> list[Output]:
        """Whole answers to several prompts, in order. When the batcher takes them all they join it together, so
        they share its token steps; otherwise they run one after another."""
        if all(self.batched(s) for _, s in jobs):
            return self.batcher.submit([(self.encode(p, s.max_tokens), s) for p, s in jobs])
        return [self.generate(p, s) for p, s in jobs]

    def _generate(self, ids: list[int], s: Sampling, cancel: threading.Event, **extra: Any) -> Any:
        """transformers' `generate` for one request alone, holding the model (seeded first if asked), in inference
        mode (a token step measured 7-9% faster than under no_grad); `extra` goes to `generate`."""
        import torch

        enc = torch.tensor([ids])
        with self.lock, torch.inference_mode():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            return self.model.generate(
                input_ids=enc, attention_mask=torch.ones_like(enc), **self._kwargs(s, cancel, len(ids)), **extra
            )

    def output(self, ids: list[int], new: list[int], s: Sampling, scores: Any = None) -> Output:
        """An answer from the generated token ids: cut at the end-of-text token and the stop strings."""
        eos = self.tokenizer.eos_token_id
        new = new[: s.max_tokens]
        count = new.index(eos) + 1 if eos in new else len(new)  # generated tokens, the end-of-text one included
        new = new[: count - 1] if eos in new else new
        text, stopped = cut_at_stop(self.decode(new), self.stops + list(s.stop))
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
                entry["top_logprobs"] = [
                    {"token": self.tokenizer.decode([int(i)]), "logprob": float(v)} for v, i in zip(values, idx)
                ]
            out.append(entry)
        return out

    def stream(
        self, prompt: str, s: Sampling, cancel: threading.Event | None = None, done: dict[str, Any] | None = None
    ) -> Iterator[str]:
        """Text pieces as they are generated, cut before a stop string (see `unfold`); stop iterating and the
        model is free of it within one token step. `done` receives finish_reason and token counts at the end."""
        import queue

        ids = self.encode(prompt, s.max_tokens)
        tokens: queue.Queue[Any] = queue.Queue()
        pieces = self.unfold(ids, s, cancel or threading.Event(), tokens.put)
        try:
            while not pieces.done:
                if piece := pieces.take(tokens.get()):
                    yield piece
        finally:
            pieces.cancel.set()  # done, stopped or abandoned: nothing more is wanted
            if done is not None:
                done.update(pieces.usage(len(ids), s.max_tokens))

    def unfold(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> Pieces:
        """Start the answer to prompt tokens `ids`: each new token id goes to `put` (called on the model thread)
        as it comes, then None, or the exception that ended it. A request the batcher takes (`batched`) runs
        there with the others, any other alone as a job of its own; either way set `cancel` and the model is free of it within
        one token step. Returns the `Pieces` that turn those tokens into the answer's text."""
        if self.batched(s):
            self.batcher.add(ids, s, cancel, put)
        else:
            self._alone(ids, s, cancel, put)
        return Pieces(self.tokenizer, self.stops + list(s.stop), cancel)

    def _alone(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        """One generation alone (transformers' `generate`, its new tokens handed on by a streamer)."""
        from transformers.generation.streamers import BaseStreamer

        class Tokens(BaseStreamer):  # type: ignore[misc]
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

        self.alone(lambda emit: self._generate(ids, s, cancel, streamer=Tokens(emit)), put)

    def alone(self, work: Callable[[Callable[[int], None]], None], put: Callable[[Any], None]) -> None:
        """Queue a generation to run alone, a job on the model thread holding the model while it runs: `work(emit)`
        generates, handing each new token id to `emit` (that is, `put`); then `put(None)`, or its error."""

        def job() -> None:
            try:
                work(put)
                put(None)
            except BaseException as exc:  # noqa: BLE001 (handed to the reader)
                put(exc)

        model_thread().submit(job)


class Pieces:
    """An answer's text as its token ids come, in pieces to send. `take(token)` gives what may go out now: a
    character split across tokens waits for the rest, and so does what may begin a stop string (with whitespace
    before it, which `generate` cuts too). Joined, the pieces are `Model.output`'s text: `tokenizer.decode(ids,
    skip_special_tokens=True)` (a character the answer ends inside of as U+FFFD, the way decode shows it) cut
    before the first stop string. When a stop string is seen or the answer ends, `done` is set and so is
    `cancel`: nothing more is wanted."""

    def __init__(self, tokenizer: Any, stops: list[str], cancel: threading.Event) -> None:
        self.tokenizer, self.stops, self.cancel = tokenizer, stops, cancel
        self.backend, self.stream = _backend(tokenizer), None
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []  # the tokens taken
        self.length = 0  # characters of their decoded text taken so far
        self.held = ""  # taken, not yet let out
        self.stopped = self.done = False

    def take(self, item: int | BaseException | None) -> str:
        """What may go out now that `item` came: a new token id, None for the end, or an exception (raised)."""
        if isinstance(item, BaseException):
            self.cancel.set()
            raise item
        if item is None:
            self.done = True
            return self._out(_decode(self.tokenizer, self.ids)[self.length :])
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
        safe = len(held) - _partial_stop(held, self.stops)
        if self.stops:  # whitespace before a stop string is cut with it: it waits too
            safe = len(held[:safe].rstrip())
        self.held = held[safe:]
        return held[:safe]

    def usage(self, prompt_tokens: int, max_tokens: int) -> dict[str, Any]:
        """Token counts and finish_reason, as `Model.output` gives them for a whole answer."""
        n = len(self.ids)
        finish = "stop" if self.stopped or n < max_tokens else "length"
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "finish_reason": finish}


@dataclass
class _Request:
    ids: list[int]
    s: Sampling
    future: Any = None  # a whole answer: its Output is set here
    put: Callable[[Any], None] | None = None  # a stream: each token goes here, then None (or the exception)
    cancel: threading.Event | None = None
    new: list[int] = field(default_factory=list)

    def finish(self, output: Callable[[], Output]) -> None:
        if self.future is not None:
            self.future.set_result(output())
        elif self.put is not None:
            self.put(None)

    def fail(self, exc: BaseException) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(exc)
        elif self.put is not None:
            self.put(exc)


class Batcher:
    """Continuous batching for one model: requests (greedy or sampled, whole answers and streams) join the running
    batch between two token steps, and leave it the step they finish, so nobody waits for another's answer to
    end. Every request keeps its own attention mask and positions over one shared, left-padded KV cache, so each
    gets the next-token logits it would get alone (up to float rounding): a greedy request its tokens, a sampled
    one draws from the distribution `generate` draws from. A request that arrives when the model is idle waits
    up to `wait` seconds for company. Each token step is one job on the model thread: a request that runs alone
    (seeded, logprobs) takes its turn between two steps."""

    def __init__(self, model: Model, size: int, wait: float) -> None:
        import queue

        self.model, self.size, self.wait = model, size, wait
        self.largest = 0  # the most requests in flight together so far
        self.joined_running = 0  # requests that joined a batch already generating
        self.in_flight = 0  # requests in the running batch now
        self.queue: queue.Queue[_Request] = queue.Queue()
        self._active: list[_Request] = []
        self._cache: Any = None
        self._mask: Any = None
        self._state = threading.Lock()
        self._scheduled = False  # a step is queued on (or running on) the model thread

    def submit(self, jobs: list[tuple[list[int], Sampling]]) -> list[Output]:
        """Whole answers to prompt tokens: the requests join together, and the answers come back in order."""
        from concurrent.futures import Future

        futures: list[Future[Output]] = [Future() for _ in jobs]
        self._put(*[_Request(ids, s, future=f) for (ids, s), f in zip(jobs, futures)])
        return [f.result() for f in futures]

    def add(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        """A stream joins: each of its tokens goes to `put` as the batch makes it, then None (`Model.unfold`)."""
        self._put(_Request(ids, s, put=put, cancel=cancel))

    def _put(self, *requests: _Request) -> None:
        if _is_model_thread():  # its steps run there: waiting for them there would wait forever
            raise RuntimeError("a batched request was made from the model thread")
        # queued back to back, then a step scheduled: an idle batcher takes them all in one prefill
        for request in requests:
            self.queue.put(request)
        self._schedule()

    def _schedule(self) -> None:
        """Queue the next step on the model thread, unless one is queued already or nothing waits."""
        with self._state:
            if self._scheduled or (not self._active and self.queue.empty()):
                return
            self._scheduled = True
        model_thread().submit(self._run)

    def _take(self, idle: bool, room: int) -> list[_Request]:
        """Requests waiting to join: when idle, take one and linger `wait` for more; else take what is there."""
        import queue
        import time

        fresh: list[_Request] = []
        if idle:
            fresh.append(self.queue.get())  # there is one: a step is only queued when a request waits or runs
            deadline = time.monotonic() + self.wait
            while len(fresh) < room and (left := deadline - time.monotonic()) > 0:
                try:
                    fresh.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
        while len(fresh) < room:
            try:
                fresh.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return fresh

    def _run(self) -> None:
        """One step of the batch (newcomers join, everybody gets a token), on the model thread; then the next.
        Its tensors are made in inference mode (a token step measured 7-9% faster than under no_grad)."""
        import torch

        active, cache, mask = self._active, self._cache, self._mask
        fresh: list[_Request] = []
        try:
            with torch.inference_mode():
                fresh = self._take(not active, self.size - len(active))
                if fresh:  # newcomers get their first token from the prefill, and join
                    self.joined_running += len(fresh) if active else 0
                    cache, mask = self._join(cache, mask, fresh)
                    active = active + fresh
                    self.largest = max(self.largest, len(active))
                    active, cache, mask = self._retire(active, cache, mask)
                if active:  # one more token for everybody
                    mask = self._step(active, cache, mask)
                    active, cache, mask = self._retire(active, cache, mask)
        except BaseException as exc:  # noqa: BLE001 (handed to every request in flight)
            for r in active + [r for r in fresh if r not in active]:
                r.fail(exc)
            active, cache, mask = [], None, None
        self._active, self._cache, self._mask = active, cache, mask
        self.in_flight = len(active)
        with self._state:
            self._scheduled = False
        self._schedule()

    def _pick(self, logits: Any, reqs: list[_Request]) -> None:
        """The next token of each request, greedy or drawn (the end-of-text token held off until `min_tokens`)."""
        eos = self.model.tokenizer.eos_token_id
        for r, row in zip(reqs, logits):
            if eos is not None and len(r.new) < r.s.min_tokens:
                row[eos] = float("-inf")
            r.new.append(int(row.argmax()) if r.s.greedy else drawn(row, r.s))
            if r.put is not None:
                r.put(r.new[-1])

    def _forward(self, input_ids: Any, mask: Any, cache: Any) -> Any:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        with self.model.lock:
            out = self.model.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
        return out.logits[:, -1, :].float(), out.past_key_values

    def _join(self, cache: Any, mask: Any, fresh: list[_Request]) -> tuple[Any, Any]:
        """Prefill the newcomers' prompts together and merge their cache into the running one (left-padded)."""
        import torch
        from transformers import DynamicCache

        pad = self.model.tokenizer.pad_token_id if self.model.tokenizer.pad_token_id is not None else 0
        width = max(len(r.ids) for r in fresh)
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in fresh])
        new_mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in fresh])
        logits, new_cache = self._forward(ids, new_mask, DynamicCache())
        self._pick(logits, fresh)
        if cache is None:
            return new_cache, new_mask
        length = max(mask.shape[1], new_mask.shape[1])

        def left(t: Any, n: int) -> Any:  # pad dimension 2 (keys, values) or 1 (mask) on the left to n
            dim = 2 if t.dim() == 4 else 1
            if t.shape[dim] == n:
                return t
            shape = list(t.shape)
            shape[dim] = n - t.shape[dim]
            return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)

        layers = [
            (
                torch.cat([left(a.keys, length), left(b.keys, length)]),
                torch.cat([left(a.values, length), left(b.values, length)]),
            )
            for a, b in zip(cache.layers, new_cache.layers)
        ]
        return DynamicCache(ddp_cache_data=layers), torch.cat([left(mask, length), left(new_mask, length)])

    def _step(self, active: list[_Request], cache: Any, mask: Any) -> Any:
        """One token for every request in flight; returns the mask grown by the column just attended to."""
        import torch

        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
        logits, _ = self._forward(torch.tensor([[r.new[-1]] for r in active]), mask, cache)
        self._pick(logits, active)
        return mask

    def _retire(self, active: list[_Request], cache: Any, mask: Any) -> tuple[list[_Request], Any, Any]:
        """Answer the finished requests and drop their rows (and columns no one attends to any more)."""
        import torch

        keep = [i for i, r in enumerate(active) if not self.model.ended(r.new, r.s, r.cancel)]
        for i, r in enumerate(active):
            if i not in keep:
                r.finish(lambda r=r: self.model.output(r.ids, r.new, r.s))
        if not keep:
            return [], None, None
        if len(keep) < len(active):
            cache.batch_select_indices(torch.tensor(keep))
            mask = mask[keep]
        used = int(mask.any(dim=0).int().argmax())  # the first column some row attends to
        if used > 0:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, used:], layer.values[:, :, used:]
            mask = mask[:, used:]
        return [active[i] for i in keep], cache, mask


def batching(models: dict[str, Model], config: ServeConfig) -> dict[str, Model]:
    """Give each model a batcher (serve.batch_size > 1)."""
    if config.batch_size > 1:
        for model in models.values():
            if model.batcher is None and model.batchable:
                model.batcher = Batcher(model, config.batch_size, config.batch_wait_ms / 1000)
    return models


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers` tokenizer whose decode is `tokenizer.decode`'s, when there is one: a fast tokenizer that
    does not clean up spaces after decoding (transformers' wrapper around it costs more than the decode). As
    transformers decides, a BPE tokenizer's clean-up is ignored unless forced."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cleans = getattr(tokenizer, "clean_up_tokenization_spaces", False) and (
        backend is None
        or type(backend.model).__name__ != "BPE"
        or getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )
    return None if cleans else backend


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, through the tokenizers backend where that gives the same
    text (transformers' wrapper around it costs more than the decode, at every token step)."""
    return (_backend(tokenizer) or tokenizer).decode(ids, skip_special_tokens=True)


def drawn(logits: Any, s: Sampling) -> int:
    """A token drawn from a row of next-token logits as `generate(do_sample=True, temperature, top_p, top_k=0)`
    draws it: transformers' own warpers, in its order, then one draw from the softmax."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(s.temperature)(None, logits[None])
    if s.top_p < 1.0:
        scores = TopPLogitsWarper(s.top_p)(None, scores)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1))


def stopped(tail: str, stops: list[str]) -> bool:
    """Whether the last tokens of an answer (decoded) hold a stop string: generation ends there."""
    return any(x in tail for x in stops)


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
