"""runner verify: re-hash artifacts and report any corruption."""

from __future__ import annotations

import argparse

from runner.cli.common import cache_arg, console, print_json


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="re-hash every artifact's files against its manifest",
        description="Read every byte of every artifact in the cache (or of one recipe's steps) and "
        "compare with the manifest. Exit 1 if anything is corrupt; --repair removes "
        "corrupt artifacts so the next apply rebuilds them.",
    )
    p.add_argument("recipe", nargs="?", help="only this recipe's current artifacts")
    cache_arg(p)
    p.add_argument("--repair", action="store_true", help="delete corrupt artifacts (they are rebuilt on apply)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from runner import api

    cache = api.open_cache(args.cache_dir, args.cache_remote)
    keys = None
    if args.recipe:
        build = api.load(args.recipe, cache_dir=args.cache_dir, cache_remote=args.cache_remote)
        ref = cache.read_ref(build.ref) or {}
        keys = [s["key"] for s in ref.get("steps", {}).values()]
    bad = api.verify(cache, keys=keys, repair=args.repair)
    checked = len(keys) if keys is not None else len(list(cache.keys())) + (len(bad) if args.repair else 0)
    if args.json:
        print_json({"checked": checked, "corrupt": bad})
    else:
        out = console()
        for key, problems in bad.items():
            out.print(f"[red]corrupt[/] {key}: {'; '.join(problems)}" + (" [dim](removed)[/]" if args.repair else ""))
        out.print(f"checked {checked} artifacts: " + (f"[red]{len(bad)} corrupt[/]" if bad else "[green]all sound[/]"))
    return 1 if bad else 0
