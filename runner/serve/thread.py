"""The process's one thread for model work.

torch's and llama.cpp's CPU kernels run on an OpenMP team per calling thread: generating on a thread per request,
or on several threads in turn, is much slower than on one thread (docs/benchmarks.md), so every generation
(whole, streamed, batched) and every embedding runs on this thread, one job at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_PREFIX = "runner-model"
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def model_thread() -> ThreadPoolExecutor:
    """The executor with the one model thread (made on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_PREFIX)
        return _executor


def on_model_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` run on the model thread (directly when already there); its result or its exception."""
    if is_model_thread():
        return fn(*args)
    return model_thread().submit(fn, *args).result()


def is_model_thread() -> bool:
    return threading.current_thread().name.startswith(_PREFIX)


def run_alone(work: Callable[[Callable[[int], None]], object], put: Callable[[Any], None]) -> None:
    """Queue a generation that runs alone, one job on the model thread: `work(emit)` generates, handing each new
    token id to `emit` (that is, `put`); then `put(None)`, or `put(exc)` with the exception that ended it."""

    def job() -> None:
        try:
            work(put)
            put(None)
        except BaseException as exc:  # handed to the reader
            put(exc)

    model_thread().submit(job)
