"""runner reference: the recipe reference, generated from the typed models (the docs embed it)."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reference",
        help="print the recipe reference (markdown) or the CLI reference",
        description="Print the recipe reference generated from the recipe's typed models, or "
        "with --cli the help of every command. docs/reference.md embeds both.",
    )
    p.add_argument("--cli", action="store_true", help="the CLI reference instead")
    p.add_argument(
        "--update",
        metavar="FILE",
        nargs="+",
        help="rewrite the generated sections (recipe and CLI references, reject reasons) inside these "
        "Markdown files' <!-- NAME:start/end --> markers",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runner import docs

    if args.update:
        for name in args.update:
            path = Path(name)
            path.write_text(docs.update_markers(path.read_text(), args.root_parser))
        return 0
    print(docs.cli_reference(args.root_parser) if args.cli else docs.recipe_reference())
    return 0
