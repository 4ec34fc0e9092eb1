"""runner query: the chunks of the recipe's index closest to a question."""

from __future__ import annotations

import argparse

from runner.cli.common import console, load, print_json, recipe_args


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="retrieve the top chunks for a question from the recipe's index",
        description="Embed the question with the index's own model and print the closest chunks with "
        "their source and score. --hybrid fuses BM25 and vector rankings (needs "
        "index.hybrid: true).",
    )
    recipe_args(p)
    p.add_argument("question")
    p.add_argument("-k", type=int, default=5, help="how many results (default 5; at least 1)")
    p.add_argument(
        "--group-by",
        choices=["document", "chunk"],
        default=None,
        help="documents (each with its best chunk) or raw chunks (default: index.group_by)",
    )
    p.add_argument(
        "--hybrid",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fuse BM25 and vector search (default: as the index was built)",
    )
    p.add_argument("--model", help="fail unless the index was built with this embedding model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from runner import api
    from runner.errors import UsageError

    if not args.question.strip():
        raise UsageError("the question is empty; ask something")
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    retriever = api.retriever(load(args), model=args.model)
    hits = retriever.search(args.question, args.k, hybrid=args.hybrid, group_by=args.group_by)
    window = retriever.truncated(args.question)
    if window:
        console(stderr=True).print(
            f"[yellow]warning[/]: the question is longer than the embedding model's window; "
            f"only its first {window} tokens were used"
        )
    if args.json:
        print_json([h._asdict() for h in hits])
        return 0
    out = console()
    for i, h in enumerate(hits, start=1):
        out.print(f"[bold]{i}.[/] [cyan]{escape(h.doc_id)}[/] (chunk {h.position}) score {h.score:.3f}")
        text = h.text if len(h.text) <= 400 else h.text[:400] + "…"
        out.print(f"   {escape(text)}", soft_wrap=True)
    return 0
