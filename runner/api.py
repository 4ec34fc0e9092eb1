"""The Python API the CLI is a thin layer over: typed, no printing. `load` a recipe, then `plan`, `apply`, read
what was built (`artifact`, `table`, `sql`, `explain`), or load its model (`model`). docs/python-api.md has an
example."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import cluster, pipeline, recipe
from runner.compile import compile_recipe
from runner.errors import LockedError, RunnerError, UsageError
from runner.graph import Graph, GraphError
from stores.cache import Artifact, ArtifactCache, default_cache_dir
from stores.hashing import hash_bytes

if TYPE_CHECKING:
    import pyarrow as pa

    from runner.retrieval import Retriever
    from runner.schema import ServeConfig, Variant
    from runner.serve.engine import Engine
    from runner.serve.guard import Guard
    from runner.steps.memory import Estimate

__all__ = [
    "ApplyResult",
    "Build",
    "apply",
    "artifact",
    "explain",
    "gc",
    "load",
    "model",
    "open_cache",
    "plan",
    "retriever",
    "serve_app",
    "sql",
    "sql_folder",
    "table",
    "training_memory",
    "verify",
]


def open_cache(cache_dir: str | Path | None = None, remote: str | Path | None = None) -> ArtifactCache:
    """The local cache (default: $RUNNER_CACHE or ~/.cache/runner), with an optional shared one
    ($RUNNER_CACHE_REMOTE or `remote`: `s3://bucket/prefix`, `gs://…`, `az://…`, `file://…` or a directory
    on a shared disk; it must exist)."""
    from stores.remote import Remote, RemoteError

    remote = remote or os.environ.get("RUNNER_CACHE_REMOTE") or None
    try:
        shared = Remote(str(remote)) if remote else None
    except RemoteError as exc:
        raise RunnerError(str(exc)) from None
    return ArtifactCache(Path(cache_dir) if cache_dir else default_cache_dir(), remote=shared)


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

    def built(self) -> dict[str, Artifact]:
        """Every step of the recipe that is built, with its artifact (one plan for all of them)."""
        out = {}
        for p in plan(self):
            art = self.cache.get(p.key) if p.state == "cached" and p.key else None
            if art is not None:
                out[p.name] = art
        return out

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
    pinned: bool = False,
) -> Build:
    """Load and validate a recipe and compile its graph (optionally only what `targets` need). `pinned`: hub
    revisions resolve to the commits the recipe's lock pins (`apply --locked`, `lock --check`)."""
    import runner.steps  # noqa: F401  (registers every step kind)
    from runner import lock

    loaded = recipe.load(path, overrides)
    if pinned:
        loaded.pins = dict((lock.read(lock.lock_path(loaded.path)) or {}).get("hub", {}))
    full = compile_recipe(loaded)
    try:
        graph = full.select(targets) if targets else full
    except GraphError as exc:
        raise UsageError(str(exc)) from None
    return Build(loaded, graph, open_cache(cache_dir, cache_remote), frozenset(full.nodes), tuple(overrides))


def executor_of(build: Build, override: str | None = None) -> cluster.Executor:
    """Where the build's data steps run: `override` (the CLI's --executor), else the recipe's `data.executor`."""
    data = build.loaded.recipe.data
    return cluster.parse_executor(override or (data.executor if data else None))


def runs_on(build: Build, override: str | None = None) -> dict[str, str]:
    """Each step's place under the executor: `ray` (as tasks) or `driver` (this process)."""
    executor = executor_of(build, override)
    return {name: cluster.runs_on(node, executor) for name, node in build.graph.nodes.items()}


def plan(build: Build) -> list[pipeline.StepPlan]:
    return pipeline.plan(build.graph, build.cache, build.previous())


def training_memory(build: Build) -> Estimate | None:
    """An estimate of the memory one training process of this recipe needs (`steps.memory.Estimate`), or None
    when the recipe does not train or the model's shape cannot be known."""
    from runner.steps.hub import folder
    from runner.steps.memory import estimate, machine_memory, model_shape
    from runner.steps.models import base_dir

    node = build.graph.nodes.get("train")
    if node is None:
        return None
    p = node.params
    spec = p.model
    base: Path | None = None
    if isinstance(spec.base, str) and spec.is_local():
        base = base_dir(spec, node.files, None)
    elif isinstance(spec.base, str) and p.commit:  # the hub snapshot when it is cached (a plan downloads nothing)
        base = folder("model", spec.base) / "snapshots" / p.commit
    vocab = spec.tokenizer.train.vocab_size if spec.tokenizer is not None and spec.tokenizer.train else None
    shape = model_shape(spec, vocab, base)
    if shape is None:
        return None
    return estimate(
        shape,
        precision=spec.precision,
        rank=p.lora.rank,
        targets=p.lora.target_modules,
        seq_len=p.train.seq_len,
        batch=p.train.batch_size,
        processes=p.train.distributed.nproc,
        gpu="gpu" in machine_memory(),
    )


@dataclass
class ApplyResult:
    steps: list[pipeline.StepResult]
    failed: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # --rebuild-nondeterministic: what differs from the lock

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.state] = out.get(s.state, 0) + 1
        return out


def apply(
    build: Build,
    *,
    reporter: pipeline.Reporter | None = None,
    keep_going: bool = False,
    locked: bool = False,
    rebuild_nondeterministic: bool = False,
    executor: str | None = None,
) -> ApplyResult:
    """Build what is not cached, then record the recipe's ref and catalog, push to the shared cache, and
    (unless `locked`) write the lock file.

    `locked`: refuse (before building anything) when the recipe, its inputs or the libraries have
    drifted from `<recipe>.lock`; then every step must come out with the lock's key and output hash,
    and a step that is not reproducible across machines is taken from the local or shared cache,
    never rebuilt (unless `rebuild_nondeterministic`, which builds it and reports what moved).
    Never writes the lock. A refusal raises `LockedError` (exit 3) after recording what was built.
    `executor`: where data steps run (`local`, `ray`, `ray://HOST:PORT`; default: the recipe's
    `data.executor`); never part of a key.
    """
    from runner import lock

    lock_file = lock.lock_path(build.loaded.path)
    moved: list[str] = []
    refuse = accept = None
    if locked:
        lock.check(build.graph, lock_file, build.loaded.raw, build.cache.stat_cache)
        refuse, accept = _lock_policy(
            build, (lock.read(lock_file) or {}).get("steps", {}), lock_file.name, rebuild_nondeterministic, moved
        )
    _fetch_models(build)
    run_step = cluster.StepRunner(executor_of(build, executor), build.cache)
    try:
        results = pipeline.execute(
            build.graph,
            build.cache,
            reporter=reporter,
            keep_going=keep_going,
            refuse=refuse,
            accept=accept,
            run_step=run_step,
        )
        _record(build, results)
    finally:
        run_step.close()
        build.cache.unpin()  # the ref now names what gc must keep
    result = ApplyResult(results, [r.name for r in results if r.state in ("failed", "skipped")], moved)
    refused = [r for r in results if r.refused]
    pushed = _push(build, results)
    if refused:
        raise LockedError("apply --locked stopped: " + "; ".join(r.error or "" for r in refused))
    if pushed:
        raise RunnerError(pushed)
    if not locked and result.ok and set(build.graph.nodes) == build.all_steps and not build.overrides:
        # the lock describes the recipe file: an apply with --set overrides (or a --target subset) leaves it be
        try:
            lock.write(lock_file, lock.make_lock(build.loaded.raw, build.graph, results, build.loaded.resolved))
        except OSError as exc:
            raise RunnerError(
                f"built, but the lock file {lock_file} could not be written ({exc.strerror}); "
                "the artifacts are in the cache: run `runner lock` where the recipe is writable"
            ) from None
    return result


def _fetch_models(build: Build) -> None:
    """Download the hub models the recipe names into the Hugging Face cache before any step runs (huggingface_hub's
    progress bars on stderr), unless every step is already built."""
    from runner.steps.hub import HubError, complete, fetch_model, folder

    models = {
        pin.split(":", 1)[1].rsplit("@", 1)[0]: c
        for pin, c in build.loaded.resolved.items()
        if pin.startswith("model:")
    }
    missing = {repo: c for repo, c in models.items() if not complete(folder("model", repo) / "snapshots" / c)}
    if not missing or all(p.state == "cached" for p in plan(build)):
        return
    for repo, commit in missing.items():
        print(f"fetching model {repo} at {commit[:12]} from the hub", file=sys.stderr, flush=True)
        try:
            fetch_model(repo, commit)
        except HubError as exc:
            raise RunnerError(str(exc)) from None


def _push(build: Build, results: list[pipeline.StepResult]) -> str | None:
    """Push what this apply has to the shared cache; a message if that failed (the local build stands)."""
    from stores.errors import StoreError

    for r in results:
        if r.key and r.artifact is not None:
            try:
                build.cache.push(r.key)
            except StoreError as exc:
                return f"built, but pushing to the shared cache failed: {exc}"
    return None


def _lock_policy(
    build: Build, locked: dict[str, Any], lock_name: str, rebuild: bool, moved: list[str]
) -> tuple[pipeline.Refuse, pipeline.Accept]:
    """What `apply --locked` refuses: keys the lock does not name, outputs that are not the lock's, and
    building a step that is not reproducible across machines (unless `rebuild`, which records what moved)."""
    fix = (
        f"if the change is intended, re-lock on purpose (`runner apply` without --locked, or `runner lock`) and "
        f"commit {lock_name}; if not, `runner verify --repair` removes a damaged local copy"
    )

    def refuse(node: Any, key: str) -> str | None:
        entry = locked.get(node.name, {})
        if entry.get("key") != key:
            if rebuild and moved:  # downstream of a rebuilt step: `accept` records it
                return None
            return f"{node.name}: key {key[:12]} is not the one {lock_name} names ({str(entry.get('key'))[:12]})"
        if not pipeline.reproducible(node) and not rebuild:
            where = build.cache.pull_problems.get(key) or (
                "in neither the local nor the shared cache"
                if build.cache.remote
                else "not in the local cache and no shared cache is set (--cache-remote / $RUNNER_CACHE_REMOTE)"
            )
            return (
                f"{node.name} is not reproducible across machines, so its locked artifact {key[:12]} must come "
                f"from a cache, but it is {where}. Push it from the machine that made the lock (apply there "
                "with --cache-remote), or build it here with --rebuild-nondeterministic (the lock stays as it is)"
            )
        return None

    def accept(node: Any, key: str, art: Artifact, how: str) -> str | None:
        entry = locked.get(node.name, {})
        if entry.get("key") != key:
            if rebuild and moved:
                moved.append(f"{node.name}: key {str(entry.get('key'))[:12]} -> {key[:12]} (an input moved)")
                return None
            return f"{node.name}: key {key[:12]} is not the one {lock_name} names ({str(entry.get('key'))[:12]})"
        if art.output_hash == entry.get("output_hash"):
            return None
        if how == "built" and rebuild and not pipeline.reproducible(node):
            moved.append(
                f"{node.name}: output {str(entry.get('output_hash'))[:12]} -> {art.output_hash[:12]} "
                "(rebuilt here; not reproducible across machines)"
            )
            return None
        return (
            f"{node.name}: the output of key {key[:12]} ({how}) has hash {art.output_hash[:12]}, but {lock_name} "
            f"records {str(entry.get('output_hash'))[:12]}; {fix}"
        )

    return refuse, accept


def _record(build: Build, results: list[pipeline.StepResult]) -> None:
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
        keys = {n: s["key"] for n, s in steps.items()}
        if not build.cache.catalog_current(build.catalog, keys):  # missing, stale or touched since written
            from stores.datastore import write_catalog

            write_catalog(build.catalog, _catalog_tables(build, keys), build.cache.root)
            build.cache.catalog_written(build.catalog, keys)


def table_sqls(cache: ArtifactCache, key: str, *, relative: bool = False) -> dict[str, str]:
    """SQL for each table (files and masked views) of the artifact under `key`; empty if it is gone.
    `relative`: file paths relative to the cache root (for catalogs, so a moved cache still reads)."""
    from stores.datastore import table_sql

    def where(k: str) -> Path:
        return cache.path(k).relative_to(cache.root) if relative else cache.path(k)

    manifest = cache.read_manifest(cache.path(key)) or {}
    names = list(manifest.get("tables", {})) + list(manifest.get("views", {}))
    return {t: table_sql(where(key), manifest, t, where) for t in names}


def _catalog_tables(build: Build, keys: dict[str, str]) -> dict[str, str]:
    from stores.datastore import view_name

    return {
        view_name(name, t): sql
        for name, key in keys.items()
        for t, sql in table_sqls(build.cache, key, relative=True).items()
    }


def artifact(build: Build, step: str) -> Artifact | None:
    """The current artifact of `step`, if built and sound."""
    if step not in build.graph.nodes:
        raise UsageError(f"no step {step!r} in {build.loaded.path}; steps: {', '.join(build.graph.order)}")
    return build.built().get(step)


def sql(build: Build, query: str) -> pa.Table:
    """Run read-only SQL over the recipe's catalog (a view per step table: `filter_length`,
    `filter_length__rejects`, …); the result as an Arrow table (`.to_pylist()`, `.to_pandas()`, or
    `duckdb.sql("select … from tbl")` over it)."""
    from stores.datastore import query as run_query

    if not build.catalog.exists():
        raise RunnerError(f"{build.loaded.path} has not been applied yet: run `runner apply {build.loaded.path}` first")
    return _read(lambda: run_query(build.catalog, query, build.cache.root), "the recipe's step tables")


def sql_folder(folder: str | Path, query: str) -> pa.Table:
    """Run read-only SQL over a folder's Parquet files (a view per file, named by its stem), such as the tables
    `runner compare --out DIR` writes."""
    from stores.datastore import query_folder

    return _read(lambda: query_folder(Path(folder), query), "the folder's tables")


def _read(run: Callable[[], pa.Table], what: str) -> pa.Table:
    """A read-only query's result; what it may not do is a usage error, a bad query a plain one."""
    import duckdb

    try:
        return run()
    except PermissionError as exc:
        raise UsageError(str(exc)) from None
    except duckdb.PermissionException as exc:
        raise UsageError(f"SQL refused: {str(exc).splitlines()[0]}; runner sql reads only {what}") from None
    except duckdb.Error as exc:
        raise RunnerError(f"SQL failed: {str(exc).splitlines()[0]}") from None


def table(build: Build, step: str, name: str = "rows") -> pa.Table:
    """A built step's table (`rows`, `rejects`, `train`, `generations`, …; masks applied) as an Arrow table: what
    `runner sql` shows as the view `STEP__NAME`, read without a catalog."""
    from stores.datastore import connect

    art = artifact(build, step)
    if art is None:
        raise RunnerError(f"step {step} of {build.loaded.path} is not built: run `runner apply {build.loaded.path}`")
    tables = table_sqls(build.cache, art.key)
    if name not in tables:
        raise UsageError(f"step {step} has no table {name!r}; its tables: {', '.join(tables) or 'none'}")
    con = connect()
    try:
        return con.sql(f"select * from {tables[name]}").to_arrow_table()
    finally:
        con.close()


def gc(cache: ArtifactCache, *, roots: list[Path] | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Delete artifacts that nothing keeps: a ref of a recipe that still exists, a lock file under `roots`
    (default: the directories of the recipes the refs name), or a running apply. `dry_run` reports exactly
    what would go."""
    drop = set()
    dirs: set[Path] = set()
    for ref in sorted(cache.refs.glob("*.json")):
        recipe_file = (cache.read_ref(ref.stem) or {}).get("recipe")
        if recipe_file and not os.path.exists(recipe_file):
            drop.add(ref.stem)
        elif recipe_file:
            dirs.add(Path(recipe_file).parent)
    from runner import lock

    keep, locks = lock.keys_under(list(roots) if roots is not None else sorted(dirs))
    before = cache.size_bytes()
    dead = cache.gc(dry_run=dry_run, keep=keep, drop_refs=drop)
    return {
        "deleted": dead,
        "dropped_refs": sorted(drop),
        "lock_files": [str(f) for f in locks],
        "freed_bytes": 0 if dry_run else before - cache.size_bytes(),
    }


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
                hits = con.execute(
                    f"select {cols} from {sql} where id = ? or id like ? || '#%' limit 1", [row_id, row_id]
                ).fetchall()
                if hits:
                    trail.append({"step": name, "table": table, "reason": hits[0][0], "detail": hits[0][1]})
            if trail and trail[-1]["table"] == "rejects":
                break
    finally:
        con.close()
    if not trail:
        raise RunnerError(
            f"no row {row_id!r} in any built step of {build.loaded.path}; row ids look like "
            'SOURCE/N (see `runner sql RECIPE "select id from source_NAME limit 5"`)'
        )
    return trail


def retriever(build: Build, *, model: str | None = None, ef_search: int | None = None) -> Retriever:
    """A Retriever over the recipe's built index (`runner apply` first)."""
    from runner.retrieval import Retriever

    if "index" not in build.graph.nodes:
        raise RunnerError(f"{build.loaded.path} has no index: section")
    art = artifact(build, "index")
    if art is None:
        raise RunnerError(
            f"the index of {build.loaded.path} is not built for the current recipe; run "
            f"`runner apply {build.loaded.path}` first"
        )
    return Retriever(art, build.graph.nodes["embed"].files, model=model, ef_search=ef_search)


def cached_results(build: Build, steps: list[pipeline.StepPlan]) -> list[pipeline.StepResult]:
    """StepResults for a fully cached plan (what a lock is made from without building)."""
    return [
        pipeline.StepResult(s.name, "cached", s.key, build.cache.get(s.key) if s.key else None, components=s.components)
        for s in steps
    ]


def model(build: Build, *, variant: Variant = "tuned") -> Engine:
    """A built recipe's model, loaded to answer: `variant` is tuned (base + LoRA adapter), base or merged, in the
    recipe's `serve.engine` (llama_cpp serves the package's GGUF whatever the variant). Generate with
    `runner.serve.engine.stream(model, model.codec.prompt(messages), Sampling(max_tokens=64))`, or whole answers
    with `model.generate_all([(prompt, sampling)])`."""
    from runner.serve.load import load_models

    return next(iter(load_models(build, [variant]).values()))


def serve_app(builds: list[Build], *, token: str | None = None) -> tuple[Guard, ServeConfig]:
    """The OpenAI-compatible app over one or more built recipes (their models side by side); the first
    recipe's `serve:` section sets host, port and limits, and its index (if any) answers document chat."""
    from runner.serve.app import create_app
    from runner.serve.load import load_models

    config = builds[0].loaded.recipe.serve
    models = {}
    for b in builds:
        if b.loaded.recipe.model is not None:
            models.update(load_models(b, b.loaded.recipe.serve.models))
    index = retriever(builds[0]) if "index" in builds[0].graph.nodes else None
    if not models and index is None:
        raise RunnerError(f"{builds[0].loaded.path} has neither a model: nor an index: section; nothing to serve")
    token = token or os.environ.get("RUNNER_SERVE_TOKEN") or None
    if token is None and config.token_env:
        token = os.environ.get(config.token_env)
        if not token:
            raise RunnerError(f"serve.token_env is {config.token_env!r} but that variable is empty; set it")
    return create_app(models, config, retriever=index, token=token), config
