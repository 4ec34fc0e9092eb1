"""Step implementations, one module per family. Importing this package registers every kind.

Modules here import only pydantic and the standard library at import time; DuckDB, torch,
transformers and friends are imported inside the run functions that need them.
"""

from runner.steps import (
    answers,
    documents,
    evaluation,
    export,
    filters,
    filters_python,
    harness,
    indexing,
    judge,
    oasst,
    packaging,
    prompts,
    sources,
    split,
    training,
)

__all__ = [
    "answers",
    "documents",
    "evaluation",
    "export",
    "filters",
    "filters_python",
    "harness",
    "indexing",
    "judge",
    "oasst",
    "packaging",
    "prompts",
    "sources",
    "split",
    "training",
]
