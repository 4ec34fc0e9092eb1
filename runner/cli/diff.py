"""runner diff: what changed between two recipes, or one recipe at two git revisions."""

from __future__ import annotations

import argparse

from runner.cli.common import cache_arg, console, print_json


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diff",
        help="compare two recipes (or RECIPE@REV): values, step keys, rows, metrics, generations",
        description="A and B are recipe paths, or a path with @REV for the recipe as committed at a "
        "git revision (its relative paths resolve beside the current file). Outputs are "
        "compared where both sides are built (run apply on each first).",
        epilog="example: runner diff recipes/quickstart.yaml@HEAD~1 recipes/quickstart.yaml --markdown",
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--set-a", action="append", default=[], metavar="KEY.PATH=VALUE", help="override on A")
    p.add_argument("--set-b", action="append", default=[], metavar="KEY.PATH=VALUE", help="override on B")
    cache_arg(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--markdown", action="store_true", help="a pull-request comment")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from runner import api
    from runner.diff import compare, markdown, recipe_at

    with recipe_at(args.a) as a_path, recipe_at(args.b) as b_path:
        a = api.load(a_path, overrides=args.set_a, cache_dir=args.cache_dir, cache_remote=args.cache_remote)
        b = api.load(b_path, overrides=args.set_b, cache_dir=args.cache_dir, cache_remote=args.cache_remote)
        d = compare(a, b)
    d["a"], d["b"] = args.a, args.b
    if args.json:
        print_json(d)
    elif args.markdown:
        print(markdown(d), end="")
    else:
        from rich.markdown import Markdown

        console().print(Markdown(markdown(d)))
    return 0
