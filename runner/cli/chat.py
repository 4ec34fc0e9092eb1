"""runner chat: talk to the recipe's model in the terminal; the conversation is carried across turns."""

from __future__ import annotations

import argparse

from runner.cli.common import console, load, recipe_args


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive terminal chat with the recipe's model (--docs: document chat)",
        description="Each turn is answered with the whole conversation so far as context. Commands: "
        "/reset forgets the conversation, /quit (or Ctrl-D) leaves.",
    )
    recipe_args(p)
    p.add_argument("--docs", action="store_true", help="answer from the recipe's index and show the sources")
    p.add_argument("--variant", default="tuned", choices=["tuned", "base", "merged"])
    p.add_argument("--max-tokens", type=int, default=128)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from runner import api
    from runner.retrieval import docs_prompt
    from runner.serve.engine import Sampling, stream

    build = load(args)
    model = api.model(build, variant=args.variant)
    index = api.retriever(build) if args.docs else None
    out = console()
    history: list[dict[str, str]] = []
    if build.loaded.recipe.serve.system:
        history.append({"role": "system", "content": build.loaded.recipe.serve.system})
    out.print(f"[dim]chatting with {model.name}; /reset forgets, /quit leaves[/]")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = history[:1] if history and history[0]["role"] == "system" else []
            continue
        if not line:
            continue
        turn = line
        if index is not None:
            hits = index.search(line, build.loaded.recipe.serve.top_k)
            turn = docs_prompt(line, hits)
        prompt = model.codec.prompt([*history, {"role": "user", "content": turn}])
        answer = "".join(stream(model, prompt, Sampling(max_tokens=args.max_tokens)))
        out.print(f"[bold]bot>[/] {escape(answer)}")
        if index is not None:
            for i, h in enumerate(hits, start=1):
                out.print(f"  [dim][{i}] {escape(h.doc_id)} (score {h.score:.3f})[/]")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
    return 0
