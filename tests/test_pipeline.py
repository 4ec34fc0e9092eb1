"""The pipeline on toy step kinds: keys, plan reasons, early cut-off, cycles, failures, locks."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import pipeline, registry
from runner.graph import Graph, GraphError, StepNode
from runner.params import Params
from runner.registry import StepContext, StepError
from stores.cache import ArtifactCache

RUNS: list[str] = []


class Text(Params):
    text: str = ""


class Mod(Params):
    modulus: int = 10


@registry.step("test.write", version="1", params=Text)
def _write(ctx: StepContext) -> None:
    RUNS.append(ctx.name)
    (ctx.out / "out.txt").write_text(ctx.params.text)


@registry.step("test.readfile", version="1", params=Text)
def _readfile(ctx: StepContext) -> None:
    RUNS.append(ctx.name)
    (ctx.out / "out.txt").write_bytes(next(iter(ctx.files.values())).read_bytes())


@registry.step("test.mod", version="1", params=Mod)
def _mod(ctx: StepContext) -> None:
    """Output = length of the input text modulo `modulus`: many inputs give the same output."""
    RUNS.append(ctx.name)
    n = len(ctx.input().file("out.txt").read_text())
    (ctx.out / "out.txt").write_text(str(n % ctx.params.modulus))


@registry.step("test.concat", version="1", params=Text)
def _concat(ctx: StepContext) -> None:
    RUNS.append(ctx.name)
    parts = [a.file("out.txt").read_text() for a in ctx.inputs]
    (ctx.out / "out.txt").write_text(ctx.params.text.join(parts))


@registry.step("test.fail", version="1", params=Text)
def _fail(ctx: StepContext) -> None:
    RUNS.append(ctx.name)
    (ctx.out / "partial.txt").write_text("half")
    raise StepError(ctx.params.text or "bad input")


@pytest.fixture
def cache(tmp_path: Path) -> ArtifactCache:
    RUNS.clear()
    return ArtifactCache(tmp_path / "c")


def chain(text: str = "hello", modulus: int = 10) -> Graph:
    return Graph(
        [
            StepNode("a", "test.write", Text(text=text)),
            StepNode("b", "test.mod", Mod(modulus=modulus), ("a",)),
            StepNode("c", "test.concat", Text(text="+"), ("b",)),
        ]
    )


def test_second_run_is_fully_cached(cache: ArtifactCache) -> None:
    first = pipeline.execute(chain(), cache)
    assert [r.state for r in first] == ["built"] * 3
    RUNS.clear()
    second = pipeline.execute(chain(), cache)
    assert [r.state for r in second] == ["cached"] * 3 and RUNS == []
    assert [r.key for r in first] == [r.key for r in second]


def test_param_change_reruns_exactly_downstream(cache: ArtifactCache) -> None:
    pipeline.execute(chain(modulus=10), cache)
    RUNS.clear()
    results = pipeline.execute(chain(modulus=3), cache)
    assert [r.state for r in results] == ["cached", "built", "built"]
    assert RUNS == ["b", "c"]


def test_early_cutoff_keeps_readers_cached(cache: ArtifactCache) -> None:
    pipeline.execute(chain(text="hello"), cache)  # len 5 % 10 = 5
    RUNS.clear()
    results = pipeline.execute(chain(text="world"), cache)  # a changes, b's output is still "5"
    assert [r.state for r in results] == ["built", "built", "cached"]
    assert RUNS == ["a", "b"]


def test_plan_says_why(cache: ArtifactCache) -> None:
    graph = chain(modulus=10)
    first = pipeline.plan(graph, cache, {})
    assert [p.state for p in first] == ["run", "pending", "pending"]
    assert first[0].why == ["never built"]
    results = pipeline.execute(graph, cache)
    previous = {r.name: r.components for r in results}
    again = pipeline.plan(chain(modulus=4), cache, previous)
    assert [p.state for p in again] == ["cached", "run", "pending"]
    assert again[1].why == ["param modulus: 10 -> 4"]
    assert "waits for b" in again[2].why[-1]


def test_plan_reports_changed_file_and_missing_artifact(cache: ArtifactCache, tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_text("one")
    graph = Graph([StepNode("r", "test.readfile", Text(), files={"in.txt": f})])
    res = pipeline.execute(graph, cache)
    previous = {"r": res[0].components}
    f.write_text("two")
    assert pipeline.plan(graph, cache, previous)[0].why == ["file in.txt changed"]
    f.write_text("one")
    cache.remove(res[0].key)
    assert "no longer in the cache" in pipeline.plan(graph, cache, previous)[0].why[0]


def test_keys_ignore_paths_and_depend_on_content(cache: ArtifactCache, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a, b = tmp_path / "x" / "in.txt", tmp_path / "y" / "in.txt"
    a.write_text("same")
    b.write_text("same")

    def key(p: Path) -> str:
        return pipeline.key_of(
            pipeline.components(StepNode("r", "test.readfile", Text(), files={"in.txt": p}), [], cache.stat_cache)
        )

    assert key(a) == key(b)
    b.write_text("different")
    assert key(a) != key(b)


def test_version_bump_changes_key(cache: ArtifactCache, monkeypatch: pytest.MonkeyPatch) -> None:
    node = StepNode("a", "test.write", Text(text="x"))
    before = pipeline.key_of(pipeline.components(node, [], cache.stat_cache))
    spec = registry.get("test.write")
    monkeypatch.setitem(registry._REGISTRY, "test.write", registry.StepSpec(spec.kind, "2", spec.params, spec.run))
    assert pipeline.key_of(pipeline.components(node, [], cache.stat_cache)) != before


def test_cycle_is_reported_with_its_path() -> None:
    with pytest.raises(GraphError, match=r"cycle: a -> b -> a|cycle: b -> a -> b"):
        Graph([StepNode("a", "test.write", Text(), ("b",)), StepNode("b", "test.write", Text(), ("a",))])


def test_unknown_input_is_reported() -> None:
    with pytest.raises(GraphError, match="reads 'zzz'"):
        Graph([StepNode("a", "test.write", Text(), ("zzz",))])


def test_failure_leaves_nothing_and_stops(cache: ArtifactCache) -> None:
    graph = Graph(
        [
            StepNode("bad", "test.fail", Text(text="the column is missing")),
            StepNode("after", "test.concat", Text(), ("bad",)),
            StepNode("other", "test.write", Text(text="fine")),
        ]
    )
    results = pipeline.execute(graph, cache)
    assert [r.state for r in results] == ["failed", "skipped", "skipped"]
    assert results[0].error == "the column is missing"
    assert list(cache.keys()) == [] and list(cache.tmp.iterdir()) == []


def test_keep_going_builds_what_does_not_need_the_failure(cache: ArtifactCache) -> None:
    graph = Graph(
        [
            StepNode("bad", "test.fail", Text()),
            StepNode("after", "test.concat", Text(), ("bad",)),
            StepNode("other", "test.write", Text(text="fine")),
        ]
    )
    results = {r.name: r.state for r in pipeline.execute(graph, cache, keep_going=True)}
    assert results == {"bad": "failed", "after": "skipped", "other": "built"}


def test_a_corrupted_artifact_is_rebuilt(cache: ArtifactCache) -> None:
    first = pipeline.execute(chain(), cache)
    target = first[1].artifact.file("out.txt")
    target.chmod(0o644)
    target.write_text("9")  # same size, different bytes
    RUNS.clear()
    again = pipeline.execute(chain(), cache)
    assert again[1].state == "built" and RUNS == ["b"]
    assert again[1].artifact.file("out.txt").read_text() == "5"


def test_manifest_records_lineage(cache: ArtifactCache) -> None:
    res = pipeline.execute(chain(), cache)
    m = res[1].artifact.manifest
    assert m["lineage"]["input_keys"] == [res[0].key]
    assert m["lineage"]["inputs"] == [res[0].artifact.output_hash]
    assert m["lineage"]["params"] == {"modulus": 10}
    assert m["kind"] == "test.mod" and m["timings"]["seconds"] >= 0


def test_one_exception_tree() -> None:
    """Every error a user can see is a RunnerError (printed as one paragraph, with its exit code)."""
    from runner.errors import LockedError, RecipeError, RunnerError, UsageError
    from runner.graph import GraphError
    from runner.pipeline import StepFailed
    from runner.registry import StepError, get

    for cls, code in (
        (RecipeError, 2),
        (UsageError, 2),
        (LockedError, 3),
        (GraphError, 2),
        (StepError, 1),
        (StepFailed, 1),
    ):
        assert issubclass(cls, RunnerError) and cls.exit_code == code, cls
    with pytest.raises(UsageError, match="no step kind 'nope'"):
        get("nope")
