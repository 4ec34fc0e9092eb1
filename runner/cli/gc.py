"""runner gc: delete artifacts that nothing keeps."""

from __future__ import annotations

import argparse

from runner.cli.common import cache_arg, console, print_json


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gc",
        help="delete artifacts that no recipe's last apply, lock file or running apply uses",
        description="Keep every artifact named by a recipe's last apply (its ref), by a lock file "
        "(*.lock) under the given roots (default: the directories of the recipes the "
        "refs name), or by an apply that is running now, and everything those build on; "
        "delete the rest and any build left by a killed process. Refs of recipe files "
        "that no longer exist are dropped. Safe while applies run. --dry-run lists "
        "exactly what gc would delete.",
    )
    p.add_argument("roots", nargs="*", metavar="ROOT", help="where to look for lock files to honour")
    cache_arg(p)
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runner import api

    cache = api.open_cache(args.cache_dir, args.cache_remote)
    report = api.gc(cache, roots=[Path(r) for r in args.roots] or None, dry_run=args.dry_run)
    if args.json:
        print_json(report)
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    kept = f" (lock files honoured: {len(report['lock_files'])})"
    freed = "" if args.dry_run else f", freed {report['freed_bytes'] / 1e6:.1f} MB"
    console().print(f"{verb} {len(report['deleted'])} artifacts{freed}{kept}")
    return 0
