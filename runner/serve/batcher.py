"""Continuous batching for a transformers model: requests join the running batch between two token steps."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from runner.serve.engine import Output, Sampling
from runner.serve.thread import is_model_thread, model_thread

if TYPE_CHECKING:
    from runner.serve.hf import TransformersEngine


@dataclass
class Request:
    ids: list[int]
    s: Sampling
    future: Future[Output] | None = None  # a whole answer: its Output is set here
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

    def __init__(self, engine: TransformersEngine, size: int, wait: float) -> None:
        import queue

        self.engine, self.size, self.wait = engine, size, wait
        self.largest = 0  # the most requests in flight together so far
        self.joined_running = 0  # requests that joined a batch already generating
        self.in_flight = 0  # requests in the running batch now
        self.queue: queue.Queue[Request] = queue.Queue()
        self._active: list[Request] = []
        self._cache: Any = None
        self._mask: Any = None
        self._state = threading.Lock()
        self._scheduled = False  # a step is queued on (or running on) the model thread

    def submit(self, jobs: list[tuple[list[int], Sampling]]) -> list[Output]:
        """Whole answers to prompt tokens: the requests join together, and the answers come back in order."""
        futures: list[Future[Output]] = [Future() for _ in jobs]
        self._put(*[Request(ids, s, future=f) for (ids, s), f in zip(jobs, futures, strict=True)])
        return [f.result() for f in futures]

    def add(self, ids: list[int], s: Sampling, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        """A stream joins: each of its tokens goes to `put` as the batch makes it, then None."""
        self._put(Request(ids, s, put=put, cancel=cancel))

    def _put(self, *requests: Request) -> None:
        if is_model_thread():  # its steps run there: waiting for them there would wait forever
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

    def _take(self, idle: bool, room: int) -> list[Request]:
        """Requests waiting to join: when idle, take one and linger `wait` for more; else take what is there."""
        import queue
        import time

        fresh: list[Request] = []
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
        """One step of the batch (newcomers join, everybody gets a token), on the model thread; then the next."""
        active = self._active
        fresh: list[Request] = []
        try:
            with self._inference():
                fresh = self._take(not active, self.size - len(active))
                if fresh:  # newcomers get their first token from the prefill, and join
                    self.joined_running += len(fresh) if active else 0
                    self._join(fresh)
                    active = active + fresh
                    self.largest = max(self.largest, len(active))
                    active = self._retire(active)
                if active:  # one more token for everybody
                    self._step(active)
                    active = self._retire(active)
        except BaseException as exc:  # handed to every request in flight
            for r in active + [r for r in fresh if r not in active]:
                r.fail(exc)
            active = []
            self._reset()
        self._active = active
        self.in_flight = len(active)
        with self._state:
            self._scheduled = False
        self._schedule()

    def _retire(self, active: list[Request]) -> list[Request]:
        """Answer the finished requests and drop them from the batch."""
        codec = self.engine.codec
        keep = [i for i, r in enumerate(active) if not codec.ended(r.new, r.s, r.cancel)]
        if len(keep) < len(active):
            self._keep(active, keep)  # before answering: a finished request's room is free when it is answered
        for i, r in enumerate(active):
            if i not in keep:
                r.finish(partial(codec.output, r.ids, r.new, r.s))
        return [active[i] for i in keep]

    # -- the model's side: a transformers model over one left-padded KV cache ---------------------------------

    def _reset(self) -> None:
        """After a failed step: nothing is in flight any more."""
        self._keep([], [])

    def _inference(self) -> Any:
        import torch

        return torch.inference_mode()  # faster than no_grad

    def _pick(self, logits: Any, reqs: list[Request]) -> None:
        """The next token of each request, greedy or drawn (the end-of-text token held off until `min_tokens`)."""
        ends = list(self.engine.codec.ends)
        for r, row in zip(reqs, logits, strict=True):
            if ends and len(r.new) < r.s.min_tokens:
                row[ends] = float("-inf")
            r.new.append(int(row.argmax()) if r.s.greedy else sample_token(row, r.s))
            if r.put is not None:
                r.put(r.new[-1])

    def _forward(self, input_ids: Any, mask: Any, cache: Any) -> Any:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        with self.engine.lock:
            out = self.engine.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
        return out.logits[:, -1, :].float(), out.past_key_values

    def _join(self, fresh: list[Request]) -> None:
        """Prefill the newcomers' prompts together and merge their cache into the running one (left-padded)."""
        import torch
        from transformers import DynamicCache

        tokenizer = self.engine.codec.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        width = max(len(r.ids) for r in fresh)
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in fresh])
        new_mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in fresh])
        logits, new_cache = self._forward(ids, new_mask, DynamicCache())
        self._pick(logits, fresh)
        cache, mask = self._cache, self._mask
        if cache is None:
            self._cache, self._mask = new_cache, new_mask
            return
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
            for a, b in zip(cache.layers, new_cache.layers, strict=True)
        ]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([left(mask, length), left(new_mask, length)])

    def _step(self, active: list[Request]) -> None:
        """One token for every request in flight; the mask grows by the column just attended to."""
        import torch

        self._mask = torch.cat([self._mask, torch.ones((self._mask.shape[0], 1), dtype=self._mask.dtype)], dim=1)
        logits, _ = self._forward(torch.tensor([[r.new[-1]] for r in active]), self._mask, self._cache)
        self._pick(logits, active)

    def _keep(self, active: list[Request], keep: list[int]) -> None:
        """Keep only the rows `keep` of the batch (and the columns someone still attends to)."""
        import torch

        if not keep:
            self._cache = self._mask = None
            return
        cache = self._cache
        cache.batch_select_indices(torch.tensor(keep))
        mask = self._mask[keep]
        used = int(mask.any(dim=0).int().argmax())  # the first column some row attends to
        if used > 0:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, used:], layer.values[:, :, used:]
            mask = mask[:, used:]
        self._mask = mask


def sample_token(logits: Any, s: Sampling) -> int:
    """A token drawn from a row of next-token logits as `generate(do_sample=True, temperature, top_p, top_k=0)`
    draws it: transformers' own warpers, in its order, then one draw from the softmax."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(s.temperature)(None, logits[None])
    if s.top_p < 1.0:
        scores = TopPLogitsWarper(s.top_p)(None, scores)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
