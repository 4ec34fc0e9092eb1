"""runner validate: check a recipe without building anything."""

from __future__ import annotations

import argparse

from runner.cli.common import console, load, recipe_args


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a recipe (YAML, keys, types, files) without running it",
        description="Load the recipe with its extends and --set overrides, validate every key, "
        "check that the files it names exist, and print the effective recipe's steps.",
    )
    recipe_args(p)
    p.add_argument("--print", action="store_true", help="print the effective recipe (after extends/--set/${...})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    build = load(args)
    out = console()
    if args.print:
        import yaml

        out.print(
            yaml.safe_dump(build.loaded.recipe.model_dump(mode="json", exclude_none=True), sort_keys=False),
            markup=False,
        )
    out.print(f"[green]ok[/]: {args.recipe} is valid ({len(build.graph.order)} steps: {', '.join(build.graph.order)})")
    return 0
