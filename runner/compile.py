"""A validated recipe becomes a graph of steps: sources -> [mix] -> filters… -> format -> split.

This is the only module that knows both the recipe's sections and the step kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.errors import Problem, RecipeError
from runner.graph import Graph, GraphError, StepNode
from runner.recipe import LoadedRecipe, show_path
from runner.steps.sources import Mix

TABLE_FORMATS = {"jsonl", "json", "csv", "parquet"}


def _files(loaded: LoadedRecipe, params: Any, at: tuple[str | int, ...], problems: list[Problem]) -> dict[str, Path]:
    """Resolve the params' external paths against the recipe that wrote them; record missing ones."""
    files: dict[str, Path] = {}
    for key, rel in params.external_paths().items():
        where = at + (key,)
        resolved = (loaded.base_dir(where) / rel).resolve()
        want_dir = key in params.DIR_FIELDS
        if not (resolved.is_dir() if want_dir else resolved.is_file()):
            what = "directory" if want_dir else "file"
            problems.append(Problem(loaded.where(where), show_path(where), f"{what} {rel!r} not found (looked for {resolved})"))
        files[rel] = resolved
    return files


def compile_recipe(loaded: LoadedRecipe) -> Graph:
    data = loaded.recipe.data
    nodes: list[StepNode] = []
    problems: list[Problem] = []

    def origin(*path: str | int) -> str:
        return str(loaded.where(tuple(path)))

    sources = []
    for i, src in enumerate(data.sources):
        files = _files(loaded, src, ("data", "sources", i), problems)
        name = f"source.{src.name}"
        kind = "source.table" if src.format in TABLE_FORMATS else f"source.{src.format}"
        nodes.append(StepNode(name, kind, src, (), files, origin("data", "sources", i)))
        sources.append(name)
    filter_files = [_files(loaded, f, ("data", "filters", i), problems) for i, f in enumerate(data.filters)]
    if problems:
        raise RecipeError(problems, "Fix the path (relative paths are relative to the recipe file).")

    last = sources[0]
    weights = [s.weight for s in data.sources]
    if len(sources) > 1 or weights != [1.0]:
        nodes.append(StepNode("mix", "mix", Mix(weights=weights, seed=data.mix_seed), tuple(sources), {},
                              origin("data", "sources")))
        last = "mix"

    used: dict[str, int] = {}
    for i, flt in enumerate(data.filters):
        if flt.name:  # an explicit name is used as is (a clash is an error)
            name = f"filter.{flt.name}"
        else:  # the second unnamed dedup is filter.dedup-2, and so on
            base = f"filter.{flt.kind}"
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}-{used[base]}"
        nodes.append(StepNode(name, f"filter.{flt.kind}", flt, (last,), filter_files[i], origin("data", "filters", i)))
        last = name

    prompt_files = _files(loaded, data.prompt, ("data", "prompt"), problems)
    if problems:
        raise RecipeError(problems, "Fix the path (relative paths are relative to the recipe file).")
    nodes.append(StepNode("format", "format", data.prompt, (last,), prompt_files, origin("data", "prompt")))
    nodes.append(StepNode("split", "split", data.split, ("format",), {}, origin("data", "split")))
    if data.export is not None:
        nodes.append(StepNode("export", "export", data.export, ("split",), {}, origin("data", "export")))
    try:
        return Graph(nodes)
    except GraphError as exc:
        raise RecipeError([Problem(loaded.where(()), "", str(exc))]) from None
