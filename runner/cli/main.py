"""`runner`: the command line. One module per subcommand; each is a few lines over `runner.api`.

Errors the user can fix print one paragraph and exit non-zero (2 for a bad recipe), never a
traceback. Importing this module imports neither torch nor DuckDB.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

DESCRIPTION = """\
Turn a declarative YAML recipe into a fine-tuned, served LLM, reproducibly.

A recipe becomes a graph of content-hashed steps (sources, filters, format, split, ...).
`apply` builds only the steps whose key is not already in the cache; `plan` says which
those are and why. The cache lives in $RUNNER_CACHE (default ~/.cache/runner), or --cache-dir.
$RUNNER_DUCKDB_MEMORY (e.g. 2GB) bounds DuckDB's memory in data steps; beyond it they spill to $TMPDIR.
"""

EPILOG = """\
examples:
  runner validate recipes/quickstart.yaml
  runner plan recipes/quickstart.yaml --set data.filters.0.min_chars=20
  runner apply recipes/quickstart.yaml
  runner sql recipes/quickstart.yaml "select step, reason, count(*) from filter_length__rejects group by all"
exit codes: 0 ok, 1 failed, 2 bad recipe or usage, 3 lock drift
"""


def build_parser() -> argparse.ArgumentParser:
    from runner.cli import commands

    parser = argparse.ArgumentParser(
        prog="runner", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands.ALL:
        command.add(sub)
    parser.set_defaults(root_parser=parser)  # for `runner reference --cli`, which documents this parser
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from runner import noop

    argv = list(sys.argv[1:] if argv is None else argv)
    replayed = noop.replay(argv)  # an unchanged, fully cached apply: answered without loading anything
    if replayed is not None:
        return replayed

    from runner.errors import RunnerError
    from stores.errors import StoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        code = args.run(args)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing half-built was kept; run the command again to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
