"""Model helpers for data steps: token counting and reward-model scoring (a local sequence-classification
model scores (prompt, reply) pairs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.registry import StepError


def load_tokenizer(path: Path) -> Any:
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise StepError(f"tokenizer {path} could not be loaded ({exc})") from None


def reward_scores(model_dir: Path, table: Any, batch_size: int, progress: Callable[..., None]) -> list[float]:
    """The model's score (first logit) of each (prompt, response) row; `progress(total, done)` as it goes."""
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise StepError(
            f"reward model {model_dir} could not be loaded ({exc}); it must be a local directory "
            "with a sequence-classification model in safetensors"
        ) from None
    model.eval()
    prompts = [p or "" for p in table.column("prompt").to_pylist()]
    replies = [r or "" for r in table.column("response").to_pylist()]
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tok(
                prompts[i : i + batch_size],
                replies[i : i + batch_size],
                truncation=True,
                max_length=512,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**enc).logits
            scores.extend(logits[:, 0].float().tolist())
            progress(len(prompts), min(i + batch_size, len(prompts)))
    return scores
