"""The subcommands, in the order `runner --help` lists them."""

from runner.cli import apply, explain, gc, graph, plan, query, reference, show, sql, status, validate, verify

ALL = [validate, plan, apply, status, show, graph, sql, explain, query, verify, gc, reference]
