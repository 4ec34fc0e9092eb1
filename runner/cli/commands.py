"""The subcommands, in the order `runner --help` lists them."""

from runner.cli import apply, diff, explain, gc, graph, lock, plan, query, reference, show, sql, status, validate, verify

ALL = [validate, plan, apply, lock, diff, status, show, graph, sql, explain, query, verify, gc, reference]
