"""runner graph: the steps and their edges, as text or mermaid."""

from __future__ import annotations

import argparse

from runner.cli.common import load, recipe_args


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "graph",
        help="print the step graph (text, or --mermaid for docs and PRs)",
        description="Print the recipe's steps in build order with their inputs.",
    )
    recipe_args(p)
    p.add_argument("--mermaid", action="store_true", help="a mermaid flowchart instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    graph = load(args).graph
    if args.mermaid:
        print(graph.mermaid())
        return 0
    for name in graph.order:
        node = graph.nodes[name]
        ups = f" <- {', '.join(node.inputs)}" if node.inputs else ""
        print(f"{name}  ({node.kind}){ups}")
    return 0
