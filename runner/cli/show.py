"""runner show: one step's manifest: files, rows, metrics, timings, lineage."""

from __future__ import annotations

import argparse

from runner.cli.common import print_json, recipe_args
from runner.errors import RunnerError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="a step's manifest (files, rows, metrics, lineage) as JSON",
        description="Print the manifest of STEP's current artifact: its key, files with hashes, "
        "row counts, metrics, timings, and lineage (params, input keys, file hashes).",
    )
    recipe_args(p)
    p.add_argument("step", help="step name, as `runner plan` lists it (e.g. filter.length)")
    p.add_argument("--path", action="store_true", help="print only the artifact's data directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from runner import api
    from runner.cli.common import load

    build = load(args)
    art = api.artifact(build, args.step)
    if art is None:
        raise RunnerError(f"step {args.step} is not built for the current recipe; run `runner apply {args.recipe}`")
    if args.path:
        print(art.files_dir)
    else:
        print_json({**art.manifest, "path": str(art.path)})
    return 0
