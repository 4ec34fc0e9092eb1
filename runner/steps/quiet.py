"""Keep the ML libraries' progress bars, banners and deprecation chatter out of runner's output."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any


def quiet_ml() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    for name in ("bitsandbytes", "peft", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
