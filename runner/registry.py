"""Step kinds register themselves here: a kind name, a version string, a params model, a run function.

The pipeline looks kinds up by name and knows nothing else about them. Bump `version`
whenever a change to `run` can change its output: that changes every key built with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from runner.errors import RunnerError, UsageError
from stores.cache import Artifact

_LIB_VERSIONS: dict[str, str] = {}


def lib_version(name: str) -> str:
    if name not in _LIB_VERSIONS:
        try:
            _LIB_VERSIONS[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            _LIB_VERSIONS[name] = "absent"
    return _LIB_VERSIONS[name]


class StepError(RunnerError):
    """A step could not run for a reason the user can fix; the message says which and how."""


@dataclass
class StepContext:
    """What a step's run function gets: its params, its inputs, where to write, and how to report."""

    name: str
    params: Any
    inputs: list[Artifact]
    input_names: list[str]
    files: dict[str, Path]
    out: Path
    scratch: Path = Path("/nonexistent")  # survives a killed build of the same key (checkpoints); removed on success
    rows: dict[str, int] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    side_files: list[str] = field(default_factory=list)
    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    requires: list[str] = field(default_factory=list)
    progress: Callable[..., None] = lambda total, done, note="": None  # (total, done, note: "loss 2.31, ...")
    locate: Callable[[str], Artifact | None] = lambda key: None
    memo_root: Path = Path("/nonexistent")  # content-addressed memos shared by builds (e.g. embeddings)
    key: str = ""  # this build's key (a step may name itself by it, e.g. in a plot title)
    log: Path = Path("/nonexistent")  # the step's log file (library chatter, subprocess output)
    final_out: Path = Path("/nonexistent")  # where `out` will be once the build is committed to the cache

    def input(self, name: str | None = None) -> Artifact:
        """The one input, or the input built by step `name`."""
        if name is None:
            if len(self.inputs) != 1:
                raise StepError(f"step {self.name} expects one input, got {len(self.inputs)}")
            return self.inputs[0]
        return self.inputs[self.input_names.index(name)]

    def memo(self, namespace: str) -> Path:
        """A directory shared by every build that computes the same thing (e.g. vectors of one model)."""
        path = self.memo_root / namespace
        path.mkdir(parents=True, exist_ok=True)
        return path

    def artifact(self, key: str) -> Artifact:
        """Another artifact this step reads by key (e.g. the base of a view), verified."""
        art = self.locate(key)
        if art is None:
            raise StepError(
                f"step {self.name}: artifact {key[:12]} it builds on is missing from the cache; "
                "run `runner verify --repair` and apply again"
            )
        return art

    def view(
        self, name: str, base: Artifact | None, base_file: str, mask: str, rows: int, select: str | None = None
    ) -> None:
        """Declare a masked view: rows of `base_file` in artifact `base` (None: this step's own output) where the
        boolean column in `mask` is true, their columns computed by the select list `select` if given.

        The base is recorded in `requires` (gc keeps it) and its output hash in a `view.json`
        file, so the view's output hash changes whenever the rows it shows do.
        """
        import json

        self.views[name] = {"base": base and base.key, "base_file": base_file, "mask": mask}
        if select:
            self.views[name]["select"] = select
        self.rows[name] = rows
        if base is not None and base.key not in self.requires:
            self.requires.append(base.key)
        record = {"base_output_hash": base and base.output_hash, "base_file": base_file, "mask": mask}
        (self.out / f"{name}.view.json").write_text(
            json.dumps(record | ({"select": select} if select else {}), sort_keys=True)
        )

    def table(self, name: str, relpath: str, rows: int, *, side: bool = False) -> Path:
        """Declare a tabular output (a Parquet file under the artifact) with its row count.

        A side table (e.g. rejects) is kept and verified, but readers of this step do not
        rebuild when only it changes (early cut-off looks at the other files).
        """
        self.tables[name] = relpath
        self.rows[name] = rows
        if side:
            self.side_files.append(relpath)
        return self.out / relpath


Reproducible = bool | Callable[[Any], bool]


@dataclass(frozen=True)
class StepSpec:
    """`reproducible`: the step writes the same bytes on any machine (True for data steps). Float
    work whose kernels or thread reductions differ across CPUs and GPUs (training, embeddings,
    evaluation) is not: under `apply --locked` its artifact is taken from a cache, never rebuilt.
    A function of the params where it depends on them."""

    kind: str
    version: str
    params: type[BaseModel]
    run: Callable[[StepContext], None]
    libs: tuple[str, ...] = ()
    reproducible: Reproducible = True
    # the same step run as tasks on a cluster (`runner.cluster.Pool`): the same output, byte for byte;
    # `shardable(params, files)` says whether a step with these params and external files does so
    sharded: Callable[[StepContext, Any], None] | None = None
    shardable: Callable[[Any, dict[str, Path]], bool] = lambda params, files: True

    def is_reproducible(self, params: Any) -> bool:
        return self.reproducible if isinstance(self.reproducible, bool) else bool(self.reproducible(params))


_REGISTRY: dict[str, StepSpec] = {}


def step(
    kind: str,
    *,
    version: str,
    params: type[BaseModel],
    libs: tuple[str, ...] = (),
    reproducible: Reproducible = True,
    sharded: Callable[[StepContext, Any], None] | None = None,
    shardable: Callable[[Any, dict[str, Path]], bool] = lambda params, files: True,
) -> Callable[[Callable[[StepContext], None]], Callable[[StepContext], None]]:
    """Register `run` as the implementation of step kind `kind` (and `sharded`, its run on a cluster)."""

    def register(run: Callable[[StepContext], None]) -> Callable[[StepContext], None]:
        if kind in _REGISTRY:
            raise ValueError(f"step kind {kind!r} registered twice")
        _REGISTRY[kind] = StepSpec(kind, version, params, run, libs, reproducible, sharded, shardable)
        return run

    return register


def get(kind: str) -> StepSpec:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise UsageError(f"no step kind {kind!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def kinds() -> list[str]:
    return sorted(_REGISTRY)


# Recipe entries: the kinds of a list in the recipe (`data.filters`, `data.sources`), each a params model told
# apart by one field (`kind:`, `format:`) and run by one step kind. A kind is registered once, by the class
# decorator of its family (`filter_kind`, `source_kind`); the recipe's unions are built from here.
_ENTRIES: dict[str, dict[type[BaseModel], str]] = {"filter": {}, "source": {}}
_ON_CHANGE: list[Callable[[], None]] = []


def add_entry(family: str, model: type[BaseModel], step_kind: str) -> None:
    _ENTRIES[family][model] = step_kind
    for callback in _ON_CHANGE:
        callback()


def remove_entry(family: str, model: type[BaseModel]) -> None:
    """Take a kind out again (and its step kind, if no other kind uses it): for tests and plug-ins."""
    step_kind = _ENTRIES[family].pop(model)
    if step_kind not in _ENTRIES[family].values():
        _REGISTRY.pop(step_kind, None)
    for callback in _ON_CHANGE:
        callback()


def entry_models(family: str) -> tuple[type[BaseModel], ...]:
    return tuple(_ENTRIES[family])


def entry_step(family: str, params: BaseModel) -> str:
    """The step kind that runs a recipe entry."""
    return _ENTRIES[family][type(params)]


def on_entries_change(callback: Callable[[], None]) -> None:
    """Call `callback` whenever a kind is added or removed (the recipe schema rebuilds its unions)."""
    _ON_CHANGE.append(callback)


def literal_values(model: type[BaseModel], field_name: str) -> tuple[str, ...]:
    """The values a `Literal[...]` field allows (a kind's tag, or a source's formats)."""
    import typing

    return typing.get_args(model.model_fields[field_name].annotation)
