"""Keep the ML libraries' progress bars, banners and deprecation chatter out of runner's output."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def quiet_ml() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    for name in ("bitsandbytes", "peft", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@contextmanager
def hub_offline() -> Iterator[None]:
    """Within: nothing asks the Hugging Face hub (`HF_HUB_OFFLINE`, read by PEFT at each call and by huggingface_hub
    at import). A step reads what `apply` fetched before it; a library's own look at the hub would only cost time,
    or fail where there is no network."""
    import huggingface_hub.constants as hub

    saved_env, saved = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


_QUIET: list[Any] = []  # llama.cpp's log callback, kept alive


def llama_cpp_quiet() -> Any:
    """llama-cpp-python with llama.cpp's own log lines off the console, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    if not _QUIET:
        _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, data: None))
        llama_cpp.llama_log_set(_QUIET[0], None)
    return llama_cpp


@contextmanager
def chatter_to(log: Path) -> Iterator[None]:
    """Within: what libraries and their subprocesses write to stderr (progress bars, log lines, `git`
    complaints) goes to `log`, both `sys.stderr` and the process's fd 2. runner's own progress is unaffected:
    its reporter writes to a stream of its own (`cli.common.console`)."""
    import sys

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved, old = os.dup(2), sys.stderr
    with log.open("a", buffering=1) as f:
        os.dup2(f.fileno(), 2)
        sys.stderr = f
        try:
            yield
        finally:
            sys.stderr = old
            os.dup2(saved, 2)
            os.close(saved)
