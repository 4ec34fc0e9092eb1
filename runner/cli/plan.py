"""runner plan: which steps are cached and which would run, and why. Never imports torch."""

from __future__ import annotations

import argparse
from typing import Any

from runner.cli.common import console, executor_arg, load, print_json, recipe_args, short


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show which steps apply would run, and why",
        description="Compute every step's key and compare with the cache and with the recipe's "
        "last apply. 'pending' steps wait on an upstream step that will run; they stay "
        "cached if its output does not change (early cut-off).",
    )
    recipe_args(p, targets=True)
    executor_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def plan_rows(steps: list[Any], where: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"step": s.name, "kind": s.kind, "state": s.state, "key": s.key, "runs_on": where[s.name], "why": s.why}
        for s in steps
    ]


def render(steps: list[Any], where: dict[str, str]) -> None:
    """One line per step; with a cluster executor, also where each step runs (ray or driver)."""
    from rich.markup import escape

    out = console()
    colors = {"cached": "green", "run": "yellow", "pending": "cyan"}
    cluster = "ray" in where.values()
    for s in steps:
        why = f"  [dim]{escape('; '.join(s.why))}[/]" if s.why else ""
        place = f"{where[s.name]:<7}" if cluster else ""
        out.print(f"[{colors[s.state]}]{s.state:>7}[/]  {place}{s.name:<24} {short(s.key)}{why}")
    todo = sum(s.state != "cached" for s in steps)
    out.print(f"{todo} of {len(steps)} steps to run" if todo else f"all {len(steps)} steps cached: nothing to do")


def run(args: argparse.Namespace) -> int:
    from runner import api

    build = load(args)
    steps = api.plan(build)
    where = api.runs_on(build, args.executor)
    if args.json:  # the rows, one shape for every recipe (the memory estimate is for people)
        print_json(plan_rows(steps, where))
        return 0
    render(steps, where)
    memory = api.training_memory(build)
    if memory is not None:
        from runner.steps.memory import machine_memory, verdict

        line, fits = verdict(memory, machine_memory())
        console().print(line if fits else f"[bold red]{line}[/]")
        built = api.artifact(build, "train")
        measured = built.manifest.get("memory") if built is not None else None
        if measured:  # what this recipe's training really used, beside the estimate
            scope = "" if measured["scope"] == "step" else " (the process's peak: per-step figures need Linux)"
            peak = measured["peak_rss_bytes"] / 2**30
            console().print(f"train as built peaked at {peak:.1f} GiB resident{scope}")
    return 0
