"""The one exception tree users see. Each message is one paragraph that says where, what, and what to do.

    RunnerError                  a problem the user can fix; the CLI prints it and exits with `exit_code`
    ├── RecipeError          2   the recipe, an override or a file it names is wrong (every problem listed)
    ├── UsageError           2   a command asked for something that does not exist (a step, a kind)
    ├── LockedError          3   `apply --locked` / `lock --check` found drift
    ├── GraphError           2   (graph.py) the steps do not form a graph: a cycle, a missing input
    ├── StepError            1   (registry.py) raised by a step's run function: bad data, a missing model, ...
    └── StepFailed           1   (pipeline.py) the pipeline's report of a failed step, naming it

    stores.errors.StoreError     the stores' own root (they import nothing from runner): the cache and shared
    ├── CacheError               caches. The pipeline turns one raised while committing a build into StepFailed;
    └── RemoteError              the CLI prints any other with exit code 1.

Internal, never seen by a user as such: `server.ApiError` (an HTTP error answer: OpenAI-shaped JSON),
`serving.ContextTooLong` / `serving.NotSupported` (become ApiError 400), `steps.reasons.Rejected` (a data
row that goes to its step's rejects table). Anything else is a bug: the pipeline logs its traceback to the
step's log and reports it as StepFailed naming the exception and the log; the CLI never shows a traceback
for a RunnerError or a StoreError.
"""

from __future__ import annotations

from dataclasses import dataclass


class RunnerError(Exception):
    """A problem the user can fix. The CLI prints its message and exits with `exit_code`; never a traceback."""

    exit_code = 1


@dataclass(frozen=True)
class Where:
    """Where a recipe value came from: a file and line, or a `--set` override."""

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


@dataclass(frozen=True)
class Problem:
    where: Where
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.path + ': ' if self.path else ''}{self.message}"


class RecipeError(RunnerError):
    """The recipe (or an override, or a file it names) is wrong. Exit code 2."""

    exit_code = 2

    def __init__(self, problems: list[Problem], hint: str = "") -> None:
        self.problems = problems
        self.hint = (
            hint or "Fix the recipe and check it with `runner validate`; docs/reference.md has the recipe reference."
        )
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"{self.problems[0]}. {self.hint}"
        lines = [f"{len(self.problems)} problems in the recipe:"]
        lines += [f"  {p}." for p in self.problems]
        lines.append(self.hint)
        return "\n".join(lines)


class UsageError(RunnerError):
    """A command was asked for something that does not exist (a step, a target). Exit code 2."""

    exit_code = 2


class LockedError(RunnerError):
    """`apply --locked` found something the lock file does not name."""

    exit_code = 3
