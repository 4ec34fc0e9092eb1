"""runner lock: write or check RECIPE.lock (for CI: `runner lock --check`)."""

from __future__ import annotations

import argparse

from runner.cli.common import console, load, recipe_args


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lock",
        help="check RECIPE.lock against the recipe and inputs (--check), or write it",
        description="--check recomputes every step key (upstream outputs taken from the lock, so "
        "nothing is built) and fails, with what moved, on any drift: an edited recipe, a "
        "changed input file, another library version. Without --check, writes the lock "
        "from the cache (every step must be built: run apply first).",
    )
    recipe_args(p)
    p.add_argument("--check", action="store_true", help="only check; exit 3 on drift")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from runner import api, lock
    from runner.errors import RunnerError

    build = load(args)
    path = lock.lock_path(build.loaded.path)
    if args.check:
        lock.check(build.graph, path, build.loaded.raw, build.cache.stat_cache)
        console().print(f"[green]ok[/]: {path} matches ({len(build.graph.order)} steps)")
        return 0
    steps = api.plan(build)
    missing = [s.name for s in steps if s.state != "cached"]
    if missing:
        raise RunnerError(f"not every step is built ({', '.join(missing)}); run `runner apply {args.recipe}` first")
    results = api.cached_results(build, steps)
    written = lock.write(path, lock.make_lock(build.loaded.raw, build.graph, results, build.loaded.resolved))
    console().print(f"{'wrote' if written else 'unchanged'}: {path}")
    return 0
