"""runner status: what the cache holds, for one recipe or overall."""

from __future__ import annotations

import argparse
import time

from runner.cli.common import cache_arg, console, print_json, short


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="built steps of a recipe (rows, age), or a cache summary",
        description="With a recipe: each step, whether its current key is built, its rows and "
        "when it was built. Without: the cache's size and the recipes it knows.",
    )
    p.add_argument("recipe", nargs="?", help="path to the recipe YAML")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value; repeatable",
    )
    cache_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from runner import api

    if args.recipe is None:
        cache = api.open_cache(args.cache_dir, args.cache_remote)
        refs = sorted(p.stem for p in cache.refs.glob("*.json"))
        artifacts, size = len(list(cache.keys())), cache.size_bytes()
        recipes = [(cache.read_ref(r) or {}).get("recipe") for r in refs]
        if args.json:
            print_json({"cache": str(cache.root), "artifacts": artifacts, "bytes": size, "recipes": recipes})
        else:
            out = console()
            out.print(f"cache {cache.root}: {artifacts} artifacts, {size / 1e6:.1f} MB")
            for r in recipes:
                out.print(f"  {r}", markup=False)
        return 0
    build = api.load(args.recipe, overrides=args.overrides, cache_dir=args.cache_dir, cache_remote=args.cache_remote)
    rows = []
    for s in api.plan(build):
        art = build.cache.get(s.key) if s.state == "cached" and s.key else None
        m = art.manifest if art else {}
        rows.append(
            {
                "step": s.name,
                "built": art is not None,
                "key": s.key,
                "rows": m.get("rows"),
                "built_at": m.get("timings", {}).get("started"),
                "seconds": m.get("timings", {}).get("seconds"),
            }
        )
    if args.json:
        print_json(rows)
        return 0
    out = console()
    for r in rows:
        age = f"{(time.time() - r['built_at']) / 60:.0f} min ago" if r["built_at"] else ""
        mark = "[green]built[/]  " if r["built"] else "[yellow]missing[/]"
        out.print(f"{mark} {r['step']:<24} {short(r['key'])}  {r['rows'] or ''}  [dim]{age}[/]")
    return 0
