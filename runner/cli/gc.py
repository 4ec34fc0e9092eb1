"""runner gc: delete artifacts no recipe's last apply uses."""

from __future__ import annotations

import argparse
import os

from runner.cli.common import cache_arg, console


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gc", help="delete artifacts that no recipe's last apply uses",
                       description="Keep every artifact named by a recipe's last apply (its ref); delete the rest "
                                   "and any build left by a killed process. Refs of recipe files that no longer "
                                   "exist are dropped first.")
    cache_arg(p)
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from runner import api

    cache = api.open_cache(args.cache_dir, args.cache_remote)
    for ref in sorted(cache.refs.glob("*.json")):
        recipe = (cache.read_ref(ref.stem) or {}).get("recipe")
        if recipe and not os.path.exists(recipe) and not args.dry_run:
            ref.unlink()
    before = cache.size_bytes()
    dead = cache.gc(dry_run=args.dry_run)
    freed = before - (before if args.dry_run else cache.size_bytes())
    verb = "would delete" if args.dry_run else "deleted"
    console().print(f"{verb} {len(dead)} artifacts" + ("" if args.dry_run else f", freed {freed / 1e6:.1f} MB"))
    return 0
