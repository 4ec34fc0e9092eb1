"""runner apply: build every step whose key is not in the cache."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.markup import escape

from runner.cli.common import console, executor_arg, load, print_json, recipe_args, short
from runner.graph import StepNode
from runner.pipeline import Reporter, StepResult


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="build what is not cached (only what changed)",
        description="Build the recipe's steps in order, reusing every cached artifact. Safe to "
        "interrupt (nothing half-built is ever kept) and to run twice at once. A complete "
        "apply writes RECIPE.lock (step keys, input hashes, library versions): commit it.",
    )
    recipe_args(p, targets=True)
    executor_arg(p)
    p.add_argument("--dry-run", action="store_true", help="show the plan, build nothing")
    p.add_argument("--keep-going", action="store_true", help="after a failure, still build steps that do not need it")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument(
        "--locked",
        action="store_true",
        help="CI mode: exit 3 if the recipe, its inputs or libraries drifted from RECIPE.lock, or any step "
        "comes out with another key or output hash than the lock's; steps not reproducible across "
        "machines (train, eval, embed, ...) are taken from the local or shared cache, never rebuilt. "
        "Never writes the lock",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-read every byte of every artifact the build uses (CI); by default each use checks "
        "sizes, the manifest's seal and file hashes through the stat cache",
    )
    p.add_argument(
        "--rebuild-nondeterministic",
        action="store_true",
        help="with --locked: build a non-reproducible step the caches lack, and report its output hash "
        "and every downstream key that moved (the lock is still not written)",
    )
    p.set_defaults(run=run)


class RichReporter(Reporter):
    """A live line per running step on stderr, a summary line per finished step."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.out = console(stderr=True)
        self.quiet = quiet
        self.progress_bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=self.out,
            transient=True,
            disable=quiet or not self.out.is_terminal,
        )
        self.tasks: dict[str, Any] = {}
        self.last_line: dict[str, tuple[float, int]] = {}
        self.said: list[str] = []  # every line printed (markup), for the no-op memo

    def say(self, markup: str) -> None:
        self.said.append(markup)
        self.out.print(markup)

    def start(self, node: StepNode, key: str) -> None:
        if not self.tasks:
            self.progress_bar.start()
        self.tasks[node.name] = self.progress_bar.add_task(f"{node.name} [dim]{short(key)}[/]", total=None)

    def waiting(self, node: StepNode, key: str) -> None:
        if not self.quiet:
            self.say(f"[dim]waiting: another apply is building {node.name} ({short(key)})[/]")

    def progress(self, node: StepNode, total: int | None, done: int, note: str = "") -> None:
        if node.name in self.tasks:
            self.progress_bar.update(
                self.tasks[node.name],
                total=total,
                completed=done,
                description=f"{node.name} {escape(note)}" if note else node.name,
            )
        if self.quiet or self.out.is_terminal:
            return
        # piped (CI logs): a plain line every 10% of the work, or every 30 s
        now, last = time.monotonic(), self.last_line.get(node.name, (0.0, -1))
        step = int(10 * done / total) if total else -1
        if step != last[1] or now - last[0] >= 30:
            self.last_line[node.name] = (now, step)
            shown = f"{done}/{total}" if total else f"{done}"
            self.say(f"  [dim]{node.name}: {shown}{', ' + escape(note) if note else ''}[/]")

    def finished(self, node: StepNode, r: StepResult) -> None:
        if node.name in self.tasks:
            self.progress_bar.remove_task(self.tasks.pop(node.name))
            if not self.tasks:
                self.progress_bar.stop()
        if self.quiet:
            return
        if r.state == "failed":
            self.say(f"[red]failed[/]  {node.name:<24} {escape(r.error or '')}")
        elif r.state == "skipped":
            self.say(f"[red]skipped[/] {node.name:<24} {escape(r.error or '')}")
        else:
            color = "green" if r.state == "built" else "dim"
            took = f" {r.seconds:.2f}s" if r.state == "built" else ""
            self.say(f"[{color}]{r.state:>7}[/]  {node.name:<24} {short(r.key)}{took}  {rows_text(r)}")
            warning = r.artifact.manifest.get("metrics", {}).get("warning") if r.artifact else None
            if warning:
                self.say(f"[yellow]warning[/]  {node.name}: {escape(str(warning))}")


def rows_text(r: StepResult) -> str:
    rows = dict(r.artifact.manifest.get("rows", {})) if r.artifact else {}
    if not rows:
        return ""
    n_in = rows.pop("in", None)
    rej = rows.pop("rejects", 0)
    parts = [f"{k} {v}" for k, v in rows.items()]
    text = ", ".join(parts)
    if n_in is not None:
        text = f"in {n_in} -> {text}" + (f" ({rej} rejected)" if rej else "")
    return f"[dim]{text}[/]"


def run(args: argparse.Namespace) -> int:
    from runner import noop

    argv = getattr(args, "argv", None)
    if argv is None or noop.memo_path(argv) is None:
        return _run(args, None)
    with noop.Recorder() as recorder:
        return _run(args, (argv, recorder))


def _run(args: argparse.Namespace, memo: tuple[list[str], Any] | None) -> int:
    from runner import api
    from runner.cli import plan

    build = load(args)
    build.cache.deep = args.verify
    if args.dry_run:
        steps = api.plan(build)
        where = api.runs_on(build, args.executor)
        print_json(plan.plan_rows(steps, where)) if args.json else plan.render(steps, where)
        return 0
    if args.rebuild_nondeterministic and not args.locked:
        from runner.errors import UsageError

        raise UsageError("--rebuild-nondeterministic only applies with --locked")
    reporter = RichReporter(quiet=args.json)
    result = api.apply(
        build,
        reporter=reporter,
        keep_going=args.keep_going,
        locked=args.locked,
        rebuild_nondeterministic=args.rebuild_nondeterministic,
        executor=args.executor,
    )
    for line in result.moved:
        console(stderr=True).print(f"[yellow]moved from the lock[/]: {escape(line)}")
    if args.json:
        print_json(
            {
                "ok": result.ok,
                "steps": [
                    {
                        "step": r.name,
                        "state": r.state,
                        "key": r.key,
                        "seconds": round(r.seconds, 3),
                        "rows": r.artifact.manifest.get("rows") if r.artifact else None,
                        "error": r.error,
                    }
                    for r in result.steps
                ],
            }
        )
    else:
        counts = result.counts()
        summary = ", ".join(f"{n} {state}" for state, n in counts.items())
        reporter.say(("[green]done[/]: " if result.ok else "[red]incomplete[/]: ") + summary)
    if memo is not None:
        _leave_memo(build, result, reporter.said, *memo)
    return 0 if result.ok else 1


def _leave_memo(build: Any, result: Any, said: list[str], argv: list[str], recorder: Any) -> None:
    """After an apply that found every step cached, the memo that lets the next identical one answer at once."""
    from rich.text import Text

    from runner import lock, noop

    if not (result.ok and not result.moved and all(r.state == "cached" for r in result.steps)):
        noop.forget(argv)
        return
    used = [build.cache.path(r.key) for r in result.steps if r.key]
    own = [build.catalog, build.catalog.with_suffix(".json"), lock.lock_path(build.loaded.path)]
    read = {**{p: list(sig) for p, sig in build.cache.stat_cache.hashed.items()}, **recorder.paths}
    noop.write(argv, read, used + own, [(m, Text.from_markup(m).plain) for m in said])
