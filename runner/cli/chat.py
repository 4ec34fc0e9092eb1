"""runner chat: talk to the recipe's model in the terminal; the conversation is carried across turns."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from runner.cli.common import console, load, recipe_args

if TYPE_CHECKING:
    from runner.schema import Variant

HELP = """\
/help            this list
/reset           forget the conversation (the system prompt stays)
/system [TEXT]   set the system prompt (no TEXT: remove it); the conversation starts over
/model VARIANT   talk to another of the recipe's models: tuned, base, merged
/save FILE       write the conversation to FILE as JSON (messages, model, system prompt)
/quit            leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C during an answer stops it and keeps the conversation. Start a message with // to send one that begins
with /. Up and down recall earlier lines."""

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # what a terminal would obey in model output: not shown


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive terminal chat with the recipe's model (--docs: document chat)",
        description="Each turn is answered with the whole conversation so far as context; answers stream\n"
        "and are rendered as Markdown. Ctrl-C stops an answer and keeps the conversation;\n"
        "Ctrl-C at the prompt, Ctrl-D or /quit leaves. The commands:",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP,
    )
    recipe_args(p)
    p.add_argument("--docs", action="store_true", help="answer from the recipe's index and show the sources")
    p.add_argument(
        "--variant", default="tuned", choices=["tuned", "base", "merged"], help="the model to start with (/model)"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="the longest answer, in tokens (default 128)")
    p.set_defaults(run=run)


class Chat:
    """One conversation with one of the recipe's models (switchable), and its commands."""

    def __init__(self, args: argparse.Namespace) -> None:
        from runner import api

        self.args, self.build = args, load(args)
        self.recipe = self.build.loaded.recipe
        self.model = api.model(self.build, variant=args.variant)
        self.index = api.retriever(self.build) if args.docs else None
        self.system = self.recipe.serve.system
        self.turns: list[dict[str, str]] = []
        self.out = console()

    def command(self, line: str) -> bool:
        """Run a slash command; False when it is time to leave."""
        from rich.markup import escape

        from runner import api

        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit", "/bye"):
            return False
        if name == "/help":
            self.out.print(escape(HELP))
        elif name == "/reset":
            self.turns = []
            self.out.print("[dim]conversation forgotten[/]")
        elif name == "/system":
            self.system, self.turns = rest or None, []
            self.out.print(f"[dim]system prompt {'set' if rest else 'removed'}; the conversation starts over[/]")
        elif name == "/model":
            if rest not in ("tuned", "base", "merged"):
                self.out.print("[red]/model takes tuned, base or merged[/]")
            else:
                self.model = api.model(self.build, variant=cast("Variant", rest))
                self.out.print(f"[dim]now talking to {escape(self.model.name)}[/]")
        elif name == "/save":
            self.save(rest)
        else:
            self.out.print(f"[red]unknown command {escape(name)}[/]; /help lists them (// sends a message with /)")
        return True

    def save(self, path: str) -> None:
        from rich.markup import escape

        if not path:
            self.out.print("[red]/save takes a file name[/]")
            return
        target = Path(path).expanduser()
        body = {"model": self.model.name, "system": self.system, "messages": self.turns}
        try:
            target.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            self.out.print(f"[red]cannot write {escape(str(target))}: {escape(exc.strerror or str(exc))}[/]")
            return
        self.out.print(f"[dim]saved {len(self.turns)} messages to {escape(str(target))}[/]")

    def ask(self, line: str) -> None:
        """Answer one message, streamed; Ctrl-C stops the answer, and what came of it stays in the conversation."""
        from rich.markup import escape

        from runner.retrieval import docs_prompt
        from runner.serve.codec import ContextTooLong
        from runner.serve.engine import Sampling, stream

        turn, hits = line, []
        if self.index is not None:
            hits = self.index.search(line, self.recipe.serve.top_k)
            turn = docs_prompt(line, hits)
        system = [{"role": "system", "content": self.system}] if self.system else []
        prompt = self.model.codec.prompt([*system, *self.turns, {"role": "user", "content": turn}])
        try:
            self.model.codec.encode(prompt, self.args.max_tokens)
        except ContextTooLong as exc:
            self.out.print(f"[red]{escape(str(exc))}[/]; /reset starts the conversation over")
            return
        pieces = stream(self.model, prompt, Sampling(max_tokens=self.args.max_tokens))
        answer, stopped = "", False
        with Answer(self.out) as shown:
            try:
                for piece in pieces:
                    answer += piece
                    shown.update(answer)
            except KeyboardInterrupt:
                stopped = True
            finally:
                pieces.close()  # the model is free within one token step
        if stopped:
            self.out.print("[dim]stopped[/]")
        for i, h in enumerate(hits, start=1):
            self.out.print(f"  [dim][{i}] {escape(h.doc_id)} (score {h.score:.3f})[/]")
        self.turns += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


class Answer:
    """An answer shown as it streams: Markdown redrawn in place on a terminal, plain text elsewhere."""

    def __init__(self, out: Any) -> None:
        self.out, self.text = out, ""
        self.live: Any = None

    def __enter__(self) -> Answer:
        from rich.live import Live
        from rich.markdown import Markdown

        self.out.print("[bold]bot>[/]", end=" " if not self.out.is_terminal else "\n")
        if self.out.is_terminal:
            self.live = Live(Markdown(""), console=self.out, refresh_per_second=10, vertical_overflow="visible")
            self.live.__enter__()
        return self

    def update(self, text: str) -> None:
        from rich.markdown import Markdown

        self.text = _CONTROL.sub("", text)
        if self.live is not None:
            self.live.update(Markdown(self.text))

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
        else:
            self.out.print(self.text, markup=False, highlight=False)


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    chat = Chat(args)
    read = _reader()
    chat.out.print(f"[dim]chatting with {escape(chat.model.name)}; /help lists commands, Ctrl-D leaves[/]")
    while True:
        try:
            line = read().strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
            chat.out.print()
            return 0
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not chat.command(line):
                return 0
            continue
        chat.ask(line[1:] if line.startswith("//") else line)


def _reader() -> Any:
    """The prompt: prompt_toolkit's line editing and history on a terminal, plain lines from a pipe."""
    if not sys.stdin.isatty():
        return lambda: input("you> ")
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    session: PromptSession[str] = PromptSession(history=InMemoryHistory())
    return lambda: session.prompt("you> ")
