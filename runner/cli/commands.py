"""The subcommands, in the order `runner --help` lists them."""

from runner.cli import (
    apply,
    chat,
    diff,
    explain,
    gc,
    graph,
    lock,
    plan,
    query,
    reference,
    serve,
    show,
    sql,
    status,
    validate,
    verify,
)

ALL = [validate, plan, apply, lock, diff, status, show, graph, sql, explain, query, serve, chat, verify, gc, reference]
