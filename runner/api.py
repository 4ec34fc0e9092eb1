"""The Python API the CLI is a thin layer over. Keyword-only, typed, no printing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import engine, recipe
from runner.compile import compile_recipe
from runner.errors import RunnerError, UsageError
from runner.graph import Graph, GraphError
from stores.cache import Artifact, ArtifactCache, default_cache_dir
from stores.hashing import hash_bytes


def open_cache(cache_dir: str | Path | None = None, remote: str | Path | None = None) -> ArtifactCache:
    """The local cache (default: $RUNNER_CACHE or ~/.cache/runner), with an optional shared one
    ($RUNNER_CACHE_REMOTE or `remote`: a directory on a shared or network filesystem)."""
    remote = remote or os.environ.get("RUNNER_CACHE_REMOTE") or None
    return ArtifactCache(Path(cache_dir) if cache_dir else default_cache_dir(), remote=Path(remote) if remote else None)


@dataclass
class Build:
    """A loaded recipe, its graph, and the cache it builds into."""

    loaded: recipe.LoadedRecipe
    graph: Graph
    cache: ArtifactCache
    all_steps: frozenset[str]
    overrides: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """The recipe's name in the cache: its stem plus a hash of where it lives (local state, not in keys)."""
        where = os.path.abspath(self.loaded.path)
        return f"{self.loaded.path.stem}-{hash_bytes(where.encode())[:12]}"

    @property
    def catalog(self) -> Path:
        return self.cache.root / "catalogs" / f"{self.ref}.duckdb"

    def previous(self) -> dict[str, Any]:
        ref = self.cache.read_ref(self.ref) or {}
        return {name: s.get("components") for name, s in ref.get("steps", {}).items() if s.get("components")}


def load(
    path: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    cache_dir: str | Path | None = None,
    cache_remote: str | Path | None = None,
    targets: list[str] | tuple[str, ...] = (),
) -> Build:
    """Load and validate a recipe and compile its graph (optionally only what `targets` need)."""
    import runner.steps  # noqa: F401  (registers every step kind)

    loaded = recipe.load(path, overrides)
    full = compile_recipe(loaded)
    try:
        graph = full.select(targets) if targets else full
    except GraphError as exc:
        raise UsageError(str(exc)) from None
    return Build(loaded, graph, open_cache(cache_dir, cache_remote), frozenset(full.nodes), tuple(overrides))


def plan(build: Build) -> list[engine.StepPlan]:
    return engine.plan(build.graph, build.cache, build.previous())


@dataclass
class ApplyResult:
    steps: list[engine.StepResult]
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.state] = out.get(s.state, 0) + 1
        return out


def apply(build: Build, *, reporter: engine.Reporter | None = None, keep_going: bool = False,
          locked: bool = False) -> ApplyResult:
    """Build what is not cached, then record the recipe's ref, catalog and lock file.

    `locked`: refuse (before building anything) when the recipe, its inputs or the libraries
    have drifted from `<recipe>.lock`, and never build a key the lock does not name.
    """
    from runner import lock

    lock_file = lock.lock_path(build.loaded.path)
    refuse = None
    if locked:
        lock.check(build.graph, lock_file, build.loaded.data, build.cache.stat_cache)
        named = {s["key"] for s in (lock.read(lock_file) or {}).get("steps", {}).values()}
        refuse = lambda node, key: None if key in named else f"key {key[:12]} is not in {lock_file.name}"  # noqa: E731
    results = engine.execute(build.graph, build.cache, reporter=reporter, keep_going=keep_going, refuse=refuse)
    _record(build, results)
    result = ApplyResult(results, [r.name for r in results if r.state in ("failed", "skipped")])
    for r in results:
        if r.key and r.artifact is not None:
            build.cache.push(r.key)
    if result.ok and set(build.graph.nodes) == build.all_steps and not build.overrides:
        # the lock describes the recipe file: an apply with --set overrides (or a --target subset) leaves it be
        lock.write(lock_file, lock.make_lock(build.loaded.data, build.graph, results))
    return result


def _record(build: Build, results: list[engine.StepResult]) -> None:
    """Update the recipe's ref (what `plan` compares with, what gc keeps) and its DuckDB catalog."""
    with build.cache.lock(f"ref-{build.ref}"):
        old = build.cache.read_ref(build.ref) or {}
        steps = {n: s for n, s in old.get("steps", {}).items() if n in build.all_steps}
        for r in results:
            if r.artifact is not None:
                steps[r.name] = {"key": r.key, "kind": build.graph.nodes[r.name].kind, "components": r.components}
        new = {"recipe": os.path.abspath(build.loaded.path), "steps": steps}
        if new != old:
            build.cache.write_ref(build.ref, new)
        if new != old or not build.catalog.exists():
            from stores.datastore import write_catalog

            write_catalog(build.catalog, catalog_tables(build, {n: s["key"] for n, s in steps.items()}))


def table_sqls(cache: ArtifactCache, key: str) -> dict[str, str]:
    """SQL for each table (files and masked views) of the artifact under `key`; empty if it is gone."""
    from stores.datastore import table_sql

    path = cache.path(key)
    manifest = cache.read_manifest(path) or {}
    names = list(manifest.get("tables", {})) + list(manifest.get("views", {}))
    return {t: table_sql(path, manifest, t, cache.path) for t in names}


def catalog_tables(build: Build, keys: dict[str, str]) -> dict[str, str]:
    from stores.datastore import view_name

    return {view_name(name, t): sql for name, key in keys.items() for t, sql in table_sqls(build.cache, key).items()}


def artifact(build: Build, step: str) -> Artifact | None:
    """The current artifact of `step`, if built and sound."""
    if step not in build.graph.nodes:
        raise UsageError(f"no step {step!r} in {build.loaded.path}; steps: {', '.join(build.graph.order)}")
    return built(build).get(step)


def built(build: Build) -> dict[str, Artifact]:
    """Every step of the current recipe that is built, with its artifact (one plan for all of them)."""
    out = {}
    for p in plan(build):
        art = build.cache.get(p.key) if p.state == "cached" and p.key else None
        if art is not None:
            out[p.name] = art
    return out


def sql(build: Build, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run SQL over the recipe's catalog (a view per step table: filter_length, filter_length__rejects, …)."""
    import duckdb

    from stores.datastore import query as run_query

    if not build.catalog.exists():
        raise RunnerError(f"{build.loaded.path} has not been applied yet: run `runner apply {build.loaded.path}` first")
    try:
        return run_query(build.catalog, query)
    except duckdb.Error as exc:
        raise RunnerError(f"SQL failed: {str(exc).splitlines()[0]}") from None


def verify(cache: ArtifactCache, *, keys: list[str] | None = None, repair: bool = False) -> dict[str, list[str]]:
    """Re-hash every byte of the given artifacts (default: all). Returns key -> problems for the bad ones."""
    bad: dict[str, list[str]] = {}
    for key in keys if keys is not None else list(cache.keys()):
        problems = cache.problems(key, deep=True)
        if problems:
            bad[key] = problems
            if repair:
                with cache.lock(key):
                    cache.remove(key)
    return bad


def explain(build: Build, row_id: str) -> list[dict[str, Any]]:
    """Follow one row id through the built steps: where it was kept, and which step dropped it and why.

    Repeated copies from a weighted mix (`ID#2`) count as the row. Stops at the step that dropped it.
    """
    from stores.datastore import connect

    ref = build.cache.read_ref(build.ref) or {}
    if not ref:
        raise RunnerError(f"{build.loaded.path} has not been applied yet: run `runner apply {build.loaded.path}` first")
    trail: list[dict[str, Any]] = []
    con = connect()
    try:
        for name in build.graph.order:
            entry = ref.get("steps", {}).get(name)
            for table, sql in (table_sqls(build.cache, entry["key"]) if entry else {}).items():
                cols = "reason, detail" if table == "rejects" else "null, null"
                hits = con.execute(f"select {cols} from {sql} where id = ? or id like ? || '#%' limit 1",
                                   [row_id, row_id]).fetchall()
                if hits:
                    trail.append({"step": name, "table": table, "reason": hits[0][0], "detail": hits[0][1]})
            if trail and trail[-1]["table"] == "rejects":
                break
    finally:
        con.close()
    if not trail:
        raise RunnerError(f"no row {row_id!r} in any built step of {build.loaded.path}; row ids look like "
                          "SOURCE/N (see `runner sql RECIPE \"select id from source_NAME limit 5\"`)")
    return trail


def retriever(build: Build, *, model: str | None = None, ef_search: int | None = None) -> Any:
    """A Retriever over the recipe's built index (`runner apply` first)."""
    from runner.retrieval import Retriever

    if "index" not in build.graph.nodes:
        raise RunnerError(f"{build.loaded.path} has no index: section")
    art = artifact(build, "index")
    if art is None:
        raise RunnerError(f"the index of {build.loaded.path} is not built for the current recipe; run "
                          f"`runner apply {build.loaded.path}` first")
    return Retriever(art, build.graph.nodes["embed"].files, model=model, ef_search=ef_search)


def cached_results(build: Build, steps: list[engine.StepPlan]) -> list[engine.StepResult]:
    """StepResults for a fully cached plan (what a lock is made from without building)."""
    return [engine.StepResult(s.name, "cached", s.key, build.cache.get(s.key) if s.key else None,
                              components=s.components) for s in steps]


def serve_app(builds: list[Build], *, token: str | None = None) -> tuple[Any, Any]:
    """The OpenAI-compatible app over one or more built recipes (their models side by side); the first
    recipe's `serve:` section sets host, port and limits, and its index (if any) answers document chat."""
    from runner.server import create_app
    from runner.serving import load_models

    config = builds[0].loaded.recipe.serve
    models = {}
    for b in builds:
        models.update(load_models(b, b.loaded.recipe.serve.models))
    index = retriever(builds[0]) if "index" in builds[0].graph.nodes else None
    if token is None and config.token_env:
        token = os.environ.get(config.token_env)
        if not token:
            raise RunnerError(f"serve.token_env is {config.token_env!r} but that variable is empty; set it")
    return create_app(models, config, retriever=index, token=token), config
