"""runner report: one self-contained HTML file about a build, or about two recipes' difference."""

from __future__ import annotations

import argparse
from pathlib import Path

from runner.cli.common import cache_arg, console


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write an HTML report of a build (or of two recipes' difference) that opens offline",
        description="One RECIPE: the step graph (state, key, time), rows in, out and rejected per data step "
        "with the top reasons and example rows, the loss curves, the metrics with 95%% intervals and the "
        "generations. Two (A B, each a path or path@REV): what `runner diff` finds, with both loss curves "
        "overlaid. One file, its charts' script inside: a CI artifact or a pull-request attachment that "
        "needs no network. Reads what the cache holds (run apply first); builds nothing.",
        epilog="examples: runner report recipes/quickstart.yaml -o report.html  |  "
        "runner report recipes/quickstart.yaml@HEAD~1 recipes/quickstart.yaml -o diff.html",
    )
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="one recipe, or two to compare (A B)")
    p.add_argument("-o", "--out", default="report.html", metavar="FILE", help="where to write (default report.html)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override (one recipe)")
    cache_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from runner import api, report
    from runner.diff import recipe_at
    from runner.errors import UsageError

    if len(args.recipes) > 2:
        raise UsageError("runner report takes one recipe, or two to compare")
    cache = {"cache_dir": args.cache_dir, "cache_remote": args.cache_remote}
    if len(args.recipes) == 1:
        build = api.load(args.recipes[0], overrides=args.set, **cache)
        if not any(p.state == "cached" for p in api.plan(build)):
            raise UsageError(f"{args.recipes[0]} has not been applied yet: run `runner apply {args.recipes[0]}` first")
        page = report.render(report.collect(build))
    else:
        with recipe_at(args.recipes[0]) as a_path, recipe_at(args.recipes[1]) as b_path:
            data = report.collect_diff(api.load(a_path, **cache), api.load(b_path, **cache))
        data["diff"]["a"], data["diff"]["b"] = args.recipes
        page = report.render_diff(data)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a report half-written is never left under its name
    console(stderr=True).print(f"wrote {out} ({len(page.encode()) / 1e6:.1f} MB); open it in a browser")
    return 0
