"""The recipe, as typed models. Sections are built from the step params models, so a
recipe key and the step it configures can never disagree. README's recipe reference is
generated from these models (`runner reference`).
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from pydantic import BaseModel, Field, field_validator, model_validator

import runner.steps  # noqa: F401  (registers every source and filter kind)
from runner import registry
from runner.params import Params
from runner.steps.evaluation import EvalConfig
from runner.steps.export import Export
from runner.steps.indexing import IndexSection
from runner.steps.models import ModelSpec
from runner.steps.packaging import PackageConfig
from runner.steps.prompts import PromptFormat
from runner.steps.sources import NAME_PATTERN
from runner.steps.split import Split
from runner.steps.train_config import Lora, TrainConfig


def _entries(family: str, tag: str) -> Any:
    """The recipe's union of one family's kinds (`data.sources[]`, `data.filters[]`), told apart by `tag`."""
    return Annotated[typing.Union[registry.entry_models(family)], Field(discriminator=tag)]  # noqa: UP007


if TYPE_CHECKING:  # statically, any source or filter; at run time, the union of the registered kinds
    from runner.steps.filter_base import FilterBase as Filter
    from runner.steps.sources import SourceBase as Source
else:
    Source = _entries("source", "format")
    Filter = _entries("filter", "kind")


Variant = Literal["tuned", "base", "merged"]


class ServeConfig(Params):
    """How `runner serve` and `runner chat` expose the recipe."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[Variant] = Field(
        default_factory=lambda: cast(list[Variant], ["tuned"]),
        description="tuned (base + adapter), base, merged; each is a model id NAME-VARIANT",
    )
    docs: bool = Field(True, description="also serve NAME-VARIANT+docs: answers from the recipe's index, with sources")
    top_k: int = Field(4, ge=1, description="chunks retrieved for document chat")
    max_tokens: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    token_env: str | None = Field(None, description="if set, requests need `Authorization: Bearer $TOKEN_ENV`")
    system: str | None = Field(None, description="system prompt put before every conversation")
    ui: bool = Field(
        True,
        description="serve the chat page at / on the same port (with the `ui` extra installed; the token, if "
        "any, is its password)",
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="requests (greedy or sampled, whole or streamed; seeded and logprobs ones run alone) "
        "generating together at most; others join between token steps (continuous batching; 1: one at a time)",
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="how long a request that finds the model idle waits for others to start with it (0: not at "
        "all; requests that arrive later join at the next token step)",
    )
    engine: Literal["transformers", "llama_cpp", "vllm"] = Field(
        "transformers",
        description="transformers (the variants in `models`), llama_cpp (the package's GGUF, as model "
        "NAME-gguf, behind runner's server), vllm (`runner serve` launches vLLM on the "
        "merged model: GPU hosts)",
    )
    n_ctx: int = Field(2048, ge=16, description="llama_cpp: context positions")


class DataSection(Params):
    """Where rows come from and what happens to them, in order."""

    sources: list[Source] = Field(min_length=1, description="one or more sources; their rows are concatenated")
    filters: list[Filter] = Field(default_factory=list, description="applied in order; each is a cached step")
    prompt: PromptFormat = PromptFormat()
    split: Split = Split()
    export: Export | None = Field(None, description="also write the split as JSONL / Parquet / a datasets dataset")
    mix_seed: int = Field(0, description="seed for sampling sources whose weight is fractional")
    executor: str = Field(
        "local",
        description="where filters run: local (this process), ray (a Ray cluster: $RAY_ADDRESS, else one started "
        "for the apply), ray:HOST:PORT or ray://HOST:PORT; never part of a key (the `ray` extra). "
        "`runner apply --executor` overrides it",
    )

    @field_validator("executor")
    @classmethod
    def _executor(cls, value: str) -> str:
        from runner.cluster import parse_executor
        from runner.errors import UsageError

        try:
            parse_executor(value)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[Source]) -> list[Source]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return sources


class Recipe(Params):
    """A whole build. Paths are relative to the recipe file that names them."""

    name: str | None = Field(None, pattern=NAME_PATTERN, description="recipe name (default: the file name)")
    vars: dict[str, Any] = Field(default_factory=dict, description="free values for `${vars.x}` interpolation")
    data: DataSection | None = Field(None, description="training data (needed to train)")
    index: IndexSection | None = Field(None, description="documents for retrieval / document chat")
    model: ModelSpec | None = Field(None, description="the base model; with it, the recipe tokenizes and trains")
    lora: Lora = Lora()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig | None = Field(None, description="held-out loss and generations after training")
    package: PackageConfig | None = Field(
        None, description="deployable forms of the tuned model (adapter, merged, GGUF)"
    )
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _sections_fit(self) -> Recipe:
        if self.model is None and self.eval is not None:
            raise ValueError("eval: needs model: (there is nothing to evaluate without a model)")
        if self.package is not None and self.model is None:
            raise ValueError("package: needs model: (there is no tuned model to package)")
        if self.model is not None and self.data is None:
            raise ValueError("model: needs data: to train on")
        if self.data is None and self.index is None:
            raise ValueError("a recipe needs data: (to train) and/or index: (documents to retrieve from)")
        return self


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        for sub in models_in(field.annotation):
            _models(sub, seen)


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation names, in order (inside unions, lists, Optional, Annotated)."""
    return [t for t in _types(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]


def _types(annotation: Any) -> list[Any]:
    """The annotation and every type nested in it (unions, lists, Annotated)."""
    out = [annotation]
    for arg in typing.get_args(annotation):
        out.extend(_types(arg))
    return out


def all_models() -> list[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    _models(Recipe, seen)
    return sorted(seen, key=lambda m: m.__name__)


def all_field_names() -> list[str]:
    return sorted({name for m in all_models() for name in m.model_fields})


def _rebuild() -> None:
    """A kind added or removed after import (a plug-in, a test): the recipe's unions follow."""
    DataSection.model_fields["sources"].annotation = list[_entries("source", "format")]  # type: ignore[misc,assignment]
    DataSection.model_fields["filters"].annotation = list[_entries("filter", "kind")]  # type: ignore[misc,assignment]
    DataSection.model_rebuild(force=True)
    Recipe.model_rebuild(force=True)


registry.on_entries_change(_rebuild)
