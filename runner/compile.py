"""A validated recipe becomes a graph of steps: sources -> [mix] -> filters… -> format -> split.

This is the only module that knows both the recipe's sections and the step kinds.
"""

from __future__ import annotations

from runner.errors import Problem, RecipeError
from runner.graph import Graph, GraphError, StepNode
from runner.recipe import LoadedRecipe, show_path


def compile_recipe(loaded: LoadedRecipe) -> Graph:
    data = loaded.recipe.data
    nodes: list[StepNode] = []
    problems: list[Problem] = []

    def origin(*path: str | int) -> str:
        return str(loaded.where(tuple(path)))

    sources = []
    for i, src in enumerate(data.sources):
        at = ("data", "sources", i, "path")
        resolved = (loaded.base_dir(at) / src.path).resolve()
        if not resolved.is_file():
            problems.append(Problem(loaded.where(at), show_path(at), f"file {src.path!r} not found (looked for {resolved})"))
        name = f"source.{src.name}"
        nodes.append(StepNode(name, "source.table", src, (), {src.path: resolved}, origin("data", "sources", i)))
        sources.append(name)
    if problems:
        raise RecipeError(problems, "Fix the path (relative paths are relative to the recipe file).")

    last = sources[0]
    if len(sources) > 1:
        from runner.steps.sources import Mix

        nodes.append(StepNode("mix", "mix", Mix(), tuple(sources), {}, origin("data", "sources")))
        last = "mix"

    used: dict[str, int] = {}
    for i, flt in enumerate(data.filters):
        if flt.name:  # an explicit name is used as is (a clash is an error)
            name = f"filter.{flt.name}"
        else:  # the second unnamed dedup is filter.dedup-2, and so on
            base = f"filter.{flt.kind}"
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}-{used[base]}"
        nodes.append(StepNode(name, f"filter.{flt.kind}", flt, (last,), {}, origin("data", "filters", i)))
        last = name

    nodes.append(StepNode("format", "format", data.prompt, (last,), {}, origin("data", "prompt")))
    nodes.append(StepNode("split", "split", data.split, ("format",), {}, origin("data", "split")))
    try:
        return Graph(nodes)
    except GraphError as exc:
        raise RecipeError([Problem(loaded.where(()), "", str(exc))]) from None
