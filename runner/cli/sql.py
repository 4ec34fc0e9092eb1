"""runner sql: query a recipe's step tables with DuckDB."""

from __future__ import annotations

import argparse

from runner.cli.common import load, print_json, recipe_args


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sql",
        help="run DuckDB SQL over the recipe's step tables",
        description="Each built step's tables are views: `source_NAME`, `filter_NAME`, `format`, "
        "`split__train`, `split__validation`; a step's rejects are `VIEW__rejects`. "
        "Macros prompt_of(turns), response_of(turns), text_of(turns) are available. "
        "Given a folder instead of a recipe, its Parquet files are the views (e.g. `runner compare --out DIR`).",
        epilog='example: runner sql recipe.yaml "select reason, count(*) from filter_length__rejects group by reason"',
    )
    recipe_args(p)
    p.add_argument("query", help="SQL to run")
    p.add_argument("--json", action="store_true", help="rows as JSON objects")
    p.add_argument("--limit", type=int, default=50, help="rows to print in table form (default 50)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runner import api

    if Path(args.recipe).is_dir():
        result = api.sql_folder(args.recipe, args.query)
    else:
        result = api.sql(load(args), args.query)
    columns = result.column_names
    rows = list(zip(*(c.to_pylist() for c in result.columns), strict=True))
    if args.json:
        print_json([dict(zip(columns, r, strict=False)) for r in rows])
        return 0
    from rich.markup import escape
    from rich.table import Table

    from runner.cli.common import console

    table = Table(*(escape(c) for c in columns))
    for r in rows[: args.limit]:
        table.add_row(*("NULL" if v is None else escape(str(v)) for v in r))
    out = console()
    out.print(table)
    if len(rows) > args.limit:
        out.print(f"[dim]{len(rows) - args.limit} more rows (use --limit or --json)[/]")
    return 0
