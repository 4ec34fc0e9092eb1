"""Lock files: `<recipe>.lock` records every step's key and output hash, every external input's content
hash, model revisions (the commit each hub revision resolved to), library versions and the effective recipe
after a successful apply.

`apply --locked` and `lock --check` recompute every key (taking upstream outputs from the lock, so
nothing needs building) and refuse any drift, saying exactly what moved; neither ever writes the lock.
Each step records whether it is reproducible across machines: `apply --locked` takes the artifacts
of those that are not from a cache (by key, checked against the locked output hash).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from runner import pipeline
from runner.errors import LockedError
from runner.graph import Graph
from runner.keypaths import flatten
from stores.files import write_json_atomic
from stores.hashing import StatCache

LOCK_VERSION = 1


def lock_path(recipe: Path) -> Path:
    """`recipes/quickstart.yaml` -> `recipes/quickstart.yaml.lock`, committed next to the recipe."""
    return recipe.with_name(recipe.name + ".lock")


def make_lock(
    raw_recipe: dict[str, Any], graph: Graph, results: list[pipeline.StepResult], hub: dict[str, str] | None = None
) -> dict[str, Any]:
    """The lock of a successful apply. `hub`: the commit each hub revision the recipe names resolved to
    (`model:ORG/NAME@REVISION`), which `apply --locked` resolves from on any machine."""
    by_name = {r.name: r for r in results}
    steps, inputs, libs, models = {}, {}, {}, {}
    for name in graph.order:
        r = by_name[name]
        comps = r.components or {}
        node = graph.nodes[name]
        steps[name] = {
            "kind": node.kind,
            "key": r.key,
            "output_hash": r.artifact.output_hash if r.artifact else None,
            "reproducible": pipeline.reproducible(node),
        }
        inputs.update(comps.get("files", {}))
        libs.update(comps.get("libs", {}))
        commit = comps.get("params", {}).get("commit")
        if commit:
            models[name] = commit
    return {
        "lock_version": LOCK_VERSION,
        "recipe": raw_recipe,
        "steps": steps,
        "inputs": dict(sorted(inputs.items())),
        "libraries": dict(sorted(libs.items())),
        "models": models,
        "hub": dict(sorted((hub or {}).items())),
    }


def write(path: Path, lock: dict[str, Any]) -> bool:
    """Write the lock unless an identical one is there (keeps mtimes and git status quiet). True if written."""
    if read(path) == lock:
        return False
    write_json_atomic(path, lock)
    return True


def read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def keys_under(roots: list[Path]) -> tuple[set[str], list[Path]]:
    """Every step key named by a runner lock file (`*.lock`) under `roots` (files or directories), and the
    lock files found; what gc keeps."""
    keys: set[str] = set()
    found: list[Path] = []
    for root in roots:
        files = [root] if root.is_file() else root.rglob("*.lock") if root.is_dir() else []
        for f in files:
            if any(part in (".git", "node_modules", ".venv") for part in f.parts):
                continue
            value = read(f)
            if value is not None and "lock_version" in value and isinstance(value.get("steps"), dict):
                found.append(f)
                keys.update(s["key"] for s in value["steps"].values() if isinstance(s, dict) and s.get("key"))
    return keys, found


def expected(graph: Graph, lock: dict[str, Any], stat_cache: StatCache) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every step's key as the recipe and inputs stand now, with upstream outputs taken from the lock."""
    out = {}
    locked = lock.get("steps", {})
    for name in graph.order:
        node = graph.nodes[name]
        ups = [locked.get(u, {}).get("output_hash") or "unknown" for u in node.inputs]
        comps = pipeline.components(node, ups, stat_cache)
        out[name] = (pipeline.key_of(comps), comps)
    return out


def drift(graph: Graph, lock: dict[str, Any] | None, raw_recipe: dict[str, Any], stat_cache: StatCache) -> list[str]:
    """Why the recipe no longer matches its lock; empty when it does."""
    if lock is None:
        return ["there is no lock file: run `runner apply` (or `runner lock`) and commit the .lock next to the recipe"]
    why: list[str] = []
    old, new = flatten(lock.get("recipe", {})), flatten(raw_recipe)
    for path in sorted(set(old) | set(new)):
        if old.get(path, "<unset>") != new.get(path, "<unset>"):
            why.append(f"recipe value {path}: {old.get(path, '<unset>')!r} -> {new.get(path, '<unset>')!r}")
    locked = lock.get("steps", {})
    for name, (key, comps) in expected(graph, lock, stat_cache).items():
        if name not in locked:
            why.append(f"step {name} is not in the lock")
            continue
        if key == locked[name]["key"]:
            continue
        for label, digest in comps["files"].items():
            if lock.get("inputs", {}).get(label) not in (None, digest):
                why.append(f"input file {label} changed (content hash {lock['inputs'][label][:12]} -> {digest[:12]})")
        for lib, version in comps["libs"].items():
            if lock.get("libraries", {}).get(lib) not in (None, version):
                why.append(f"library {lib} {lock['libraries'][lib]} -> {version}")
        commit, was = comps.get("params", {}).get("commit"), lock.get("models", {}).get(name)
        if was and commit != was:
            why.append(f"the hub commit of {name}'s model {was[:12]} -> {str(commit)[:12]}")
        why.append(f"step {name}: key {locked[name]['key'][:12]} -> {key[:12]}")
    for name in locked:
        if name not in graph.nodes:
            why.append(f"step {name} is in the lock but not in the recipe")
    return list(dict.fromkeys(why))


def check(graph: Graph, lock_file: Path, raw_recipe: dict[str, Any], stat_cache: StatCache) -> None:
    why = drift(graph, read(lock_file), raw_recipe, stat_cache)
    if why:
        shown = os.path.relpath(lock_file)
        raise LockedError(
            f"{shown} does not match the recipe: "
            + "; ".join(why)
            + ". If the change is intended, run `runner apply` without --locked and commit the new lock."
        )
