"""runner explain: which step kept or dropped a row, and why."""

from __future__ import annotations

import argparse

from runner.cli.common import console, load, print_json, recipe_args


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="follow a row id through the steps: kept where, dropped by which filter, why",
        description="Trace ROW_ID through the recipe's last apply. Row ids are SOURCE/N (record "
        "number), SOURCE/ID for sources with an id field, SOURCE/MESSAGE_ID for oasst.",
    )
    recipe_args(p)
    p.add_argument("row_id", help="e.g. sample/12")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from runner import api

    trail = api.explain(load(args), args.row_id)
    if args.json:
        print_json(trail)
        return 0
    out = console()
    for t in trail:
        if t["table"] == "rejects":
            detail = f" ({escape(str(t['detail']))})" if t["detail"] else ""
            out.print(f"[red]dropped[/] by {t['step']}: {escape(str(t['reason']))}{detail}")
        else:
            out.print(f"[green]kept[/]    in {t['step']}" + (f" ({t['table']})" if t["table"] != "rows" else ""))
    return 0
