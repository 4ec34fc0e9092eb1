"""Keys, plan and execute. Knows steps, keys and artifacts; nothing about ML or DuckDB.

A step's key hashes its kind, its implementation's version, its canonical params, the
output hashes of its inputs, the content hashes of its external files and the versions
of the libraries it declares. Inputs enter by *output* hash, not by key, which gives
early cut-off: a step that re-runs and writes the same bytes leaves its readers cached.
"""

from __future__ import annotations

import shutil
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from filelock import Timeout
from pydantic import BaseModel

from runner import registry
from runner.errors import RunnerError
from runner.graph import Graph, StepNode
from runner.keypaths import flatten
from runner.peak import PeakRss
from runner.registry import StepContext, StepError, lib_version
from stores.cache import Artifact, ArtifactCache, CacheError
from stores.hashing import StatCache, hash_json

State = Literal["cached", "run", "pending"]


def reproducible(node: StepNode) -> bool:
    """Whether a step writes the same bytes on any machine (see `registry.StepSpec`)."""
    return registry.get(node.kind).is_reproducible(node.params)


def canonical_params(params: Any) -> Any:
    if isinstance(params, BaseModel):
        return params.model_dump(mode="json")
    return params


def components(node: StepNode, input_hashes: list[str], stat_cache: StatCache) -> dict[str, Any]:
    """Everything a step's key is made of, and nothing else."""
    spec = registry.get(node.kind)
    return {
        "kind": node.kind,
        "version": spec.version,
        "params": canonical_params(node.params),
        "inputs": input_hashes,
        "files": {label: stat_cache.hash_tree(path) for label, path in sorted(node.files.items())},
        "libs": {lib: lib_version(lib) for lib in spec.libs},
    }


def key_of(comps: dict[str, Any]) -> str:
    return hash_json(comps)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def why_run(node: StepNode, now: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    """Why a step must run, by comparing its key components with those of its last build."""
    if before is None:
        return ["never built"]
    why: list[str] = []
    if now["version"] != before.get("version"):
        why.append(f"implementation of {node.kind} changed (version {before.get('version')} -> {now['version']})")
    new, old = flatten(now["params"]), flatten(before.get("params", {}))
    for path in sorted(set(new) | set(old)):
        if new.get(path, "<unset>") != old.get(path, "<unset>"):
            why.append(f"param {path}: {_short(old.get(path, '<unset>'))} -> {_short(new.get(path, '<unset>'))}")
    old_inputs = before.get("inputs", [])
    for i, up in enumerate(node.inputs):
        if i < len(now["inputs"]) and (i >= len(old_inputs) or now["inputs"][i] != old_inputs[i]):
            why.append(f"input {up} changed")
    if len(old_inputs) != len(node.inputs):
        why.append(f"inputs changed ({len(old_inputs)} -> {len(node.inputs)})")
    old_files = before.get("files", {})
    for label in sorted(set(now["files"]) | set(old_files)):
        if label not in old_files:
            why.append(f"file {label} added")
        elif label not in now["files"]:
            why.append(f"file {label} removed")
        elif now["files"][label] != old_files[label]:
            why.append(f"file {label} changed")
    for lib, version in now["libs"].items():
        if before.get("libs", {}).get(lib) != version:
            why.append(f"library {lib} {before.get('libs', {}).get(lib, '<none>')} -> {version}")
    return why or ["built before, but its artifact is no longer in the cache (gc'd or corrupt)"]


@dataclass
class StepPlan:
    name: str
    kind: str
    state: State
    key: str | None
    why: list[str] = field(default_factory=list)
    components: dict[str, Any] | None = None


def plan(graph: Graph, cache: ArtifactCache, previous: dict[str, Any]) -> list[StepPlan]:
    """Each step cached / to run / pending (its key waits on an upstream that will run), with reasons.

    `previous` maps step name to the components of its last successful build (from the ref).
    Side-effect free: builds nothing, locks nothing.
    """
    out: dict[str, StepPlan] = {}
    hashes: dict[str, str] = {}
    for name in graph.order:
        node = graph.nodes[name]
        ups = [u for u in node.inputs if u not in hashes]
        if ups:
            now = components(node, [], cache.stat_cache)
            before = previous.get(name)
            why = [f"waits for {', '.join(ups)} (stays cached if that output is unchanged)"]
            if before is not None:
                now["inputs"] = before.get("inputs", [])
                why = [w for w in why_run(node, now, before) if not w.startswith("built before")] + why
            out[name] = StepPlan(name, node.kind, "pending", None, why)
            continue
        comps = components(node, [hashes[u] for u in node.inputs], cache.stat_cache)
        key = key_of(comps)
        art = cache.get(key)
        remote = cache.remote.read_manifest(key) if art is None and cache.remote else None
        if art is not None:
            hashes[name] = art.output_hash
            out[name] = StepPlan(name, node.kind, "cached", key, [], comps)
        elif remote is not None and "output_hash" in remote:
            hashes[name] = remote["output_hash"]
            out[name] = StepPlan(name, node.kind, "cached", key, ["in the shared cache: will be pulled"], comps)
        else:
            out[name] = StepPlan(name, node.kind, "run", key, why_run(node, comps, previous.get(name)), comps)
    return [out[n] for n in graph.order]


class Reporter:
    """Hooks the executor calls; the CLI renders them, tests record them. All optional."""

    def start(self, node: StepNode, key: str) -> None: ...
    def waiting(self, node: StepNode, key: str) -> None: ...
    def progress(self, node: StepNode, total: int | None, done: int, note: str = "") -> None: ...
    def finished(self, node: StepNode, result: StepResult) -> None: ...


@dataclass
class StepResult:
    name: str
    state: Literal["cached", "built", "failed", "skipped"]
    key: str | None = None
    artifact: Artifact | None = None
    seconds: float = 0.0
    error: str | None = None
    components: dict[str, Any] | None = None
    refused: bool = False  # failed because a policy (the lock) refused it, not because the step broke
    pulled: bool = False  # cached: taken from the shared cache by this apply


class StepFailed(RunnerError):
    """A step failed: its own StepError, a bug (traceback in the step's log) or a refusal by the lock."""

    def __init__(self, name: str, message: str, *, refused: bool = False) -> None:
        super().__init__(f"step {name} failed: {message}")
        self.name = name
        self.message = message
        self.refused = refused


RunStep = Callable[[StepNode, StepContext], None]
Refuse = Callable[[StepNode, str], str | None]  # a reason not to build this key (e.g. not in the lock), or None
# a reason not to use this artifact (e.g. its output is not the lock's); the str says how it was had:
# "cached", "pulled" or "built"
Accept = Callable[[StepNode, str, Artifact, str], str | None]


def _default_run(node: StepNode, ctx: StepContext) -> None:
    registry.get(node.kind).run(ctx)


def execute(
    graph: Graph,
    cache: ArtifactCache,
    *,
    reporter: Reporter | None = None,
    keep_going: bool = False,
    run_step: RunStep = _default_run,
    refuse: Refuse | None = None,
    accept: Accept | None = None,
) -> list[StepResult]:
    """Build every step whose key is not cached, in order. Per-key locks make concurrent applies safe.

    A failed step stops the build (the rest are skipped) unless `keep_going`, which still
    builds every step that does not need the failed one. A refusal (by `refuse` before building,
    or `accept` after an artifact is had) always stops it. Never raises for a step's failure.
    """
    reporter = reporter or Reporter()
    results: dict[str, StepResult] = {}
    cache.clean_tmp()
    stopped = False
    for name in graph.order:
        node = graph.nodes[name]
        bad = [u for u in node.inputs if results[u].state in ("failed", "skipped")]
        if bad or stopped:
            why = f"upstream {', '.join(bad)} did not build" if bad else "not run: an earlier step failed"
            results[name] = StepResult(name, "skipped", error=why)
            reporter.finished(node, results[name])
            continue
        ups = [results[u].artifact for u in node.inputs]
        comps = components(node, [a.output_hash for a in ups if a is not None], cache.stat_cache)
        key = key_of(comps)
        cache.pin(key)  # before it is read or built: gc keeps what a running apply uses
        try:
            results[name] = _build_one(node, key, comps, ups, cache, reporter, run_step, refuse)  # type: ignore[arg-type]
            got = results[name]
            how = "built" if got.state == "built" else "pulled" if got.pulled else "cached"
            if accept is not None and got.artifact is not None and (refusal := accept(node, key, got.artifact, how)):
                raise StepFailed(name, refusal, refused=True)
        except StepFailed as exc:
            results[name] = StepResult(
                name, "failed", key=key, error=exc.message, components=comps, refused=exc.refused
            )
            reporter.finished(node, results[name])
            stopped = not keep_going or exc.refused
            continue
        reporter.finished(node, results[name])
    return [results[n] for n in graph.order]


def _build_one(
    node: StepNode,
    key: str,
    comps: dict[str, Any],
    inputs: list[Artifact],
    cache: ArtifactCache,
    reporter: Reporter,
    run_step: RunStep,
    refuse: Refuse | None,
) -> StepResult:
    """The step's artifact: from the cache (local, then shared), else built under the key's lock."""
    art = cache.get(key)
    pulled = art is None and (art := cache.pull(key)) is not None
    if art is not None:
        return StepResult(node.name, "cached", key, art, components=comps, pulled=pulled)
    if refuse is not None and (why := refuse(node, key)):
        raise StepFailed(node.name, why, refused=True)
    lock = cache.lock(key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        reporter.waiting(node, key)
        lock.acquire()
    try:
        art = cache.get(key)  # another apply may have built it while we waited
        if art is not None:
            return StepResult(node.name, "cached", key, art, components=comps)
        reporter.start(node, key)
        tmp = cache.begin(key)
        ctx = _context(node, key, inputs, cache, tmp, reporter)
        started = time.time()
        with PeakRss() as peak:
            _run_logged(node, ctx, run_step, lambda: cache.abort(tmp))
        seconds = time.time() - started
        try:
            art = cache.commit(key, tmp, _manifest(node, ctx, comps, inputs, started, seconds, peak.figure()))
        except CacheError as exc:
            cache.abort(tmp)
            raise StepFailed(node.name, str(exc)) from None
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        return StepResult(node.name, "built", key, art, seconds, components=comps)
    finally:
        lock.release()


def _context(
    node: StepNode, key: str, inputs: list[Artifact], cache: ArtifactCache, tmp: Path, reporter: Reporter
) -> StepContext:
    return StepContext(
        name=node.name,
        key=key,
        params=node.params,
        inputs=inputs,
        input_names=list(node.inputs),
        files=dict(node.files),
        out=tmp / "data",
        scratch=cache.root / "scratch" / key,
        progress=lambda total, done, note="": reporter.progress(node, total, done, note),
        locate=cache.get,
        memo_root=cache.root / "memo",
        log=cache.root / "logs" / f"{key}.log",
        final_out=cache.path(key) / "data",
    )


def _run_logged(node: StepNode, ctx: StepContext, run_step: RunStep, abort: Callable[[], None]) -> None:
    """Run the step; library warnings go to its log (not the console), a bug's traceback too. On failure the
    half-written output is dropped (`abort`) and the step fails with one line."""
    log = ctx.log
    log.unlink(missing_ok=True)  # a failed attempt's log is not this build's
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            run_step(node, ctx)
        if caught:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                f.write("".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught))
    except StepError as exc:
        abort()
        raise StepFailed(node.name, str(exc)) from None
    except Exception as exc:  # a bug, not bad input: keep the traceback for the report
        abort()
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        raise StepFailed(node.name, f"{type(exc).__name__}: {exc} (traceback in {log})") from None


def _manifest(
    node: StepNode,
    ctx: StepContext,
    comps: dict[str, Any],
    inputs: list[Artifact],
    started: float,
    seconds: float,
    memory: dict[str, Any],
) -> dict[str, Any]:
    """What the cache records beside the step's files: its tables, metrics and where it came from."""
    return {
        "kind": node.kind,
        "built_as": node.name,
        "rows": ctx.rows,
        "tables": ctx.tables,
        "metrics": ctx.metrics,
        "side_files": ctx.side_files,
        "views": ctx.views,
        "requires": ctx.requires,
        "timings": {"started": started, "seconds": round(seconds, 6)},
        "memory": memory,
        "lineage": {
            **comps,
            "input_keys": [a.key for a in inputs],
            "input_steps": list(node.inputs),
            "file_paths": {label: str(p) for label, p in node.files.items()},
        },
    }
