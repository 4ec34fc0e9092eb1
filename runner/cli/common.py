"""Arguments and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def recipe_args(p: argparse.ArgumentParser, *, targets: bool = False) -> None:
    p.add_argument("recipe", help="path to the recipe YAML")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value (YAML syntax; list items by index), e.g. --set data.split.seed=1; repeatable",
    )
    cache_arg(p)
    if targets:
        p.add_argument(
            "--target",
            dest="targets",
            action="append",
            default=[],
            metavar="STEP",
            help="only the steps needed for STEP (repeatable)",
        )


def executor_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        default=None,
        metavar="WHERE",
        help="where filters run: local, ray (the Ray cluster at $RAY_ADDRESS, else one started for this run), "
        "ray:HOST:PORT or ray://HOST:PORT (the ray extra). Outputs and keys are the same on any executor; "
        "workers read and write shards through the shared cache (--cache-remote), else the local cache "
        "directory, which every node must then see (default: the recipe's data.executor)",
    )


def cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", default=None, metavar="DIR", help="artifact cache (default: $RUNNER_CACHE or ~/.cache/runner)"
    )
    p.add_argument(
        "--cache-remote",
        default=None,
        metavar="URL",
        help="shared cache: s3://bucket/prefix, gs://…, az://…, file://… or a directory on a shared disk "
        "(it must exist). Artifacts are pulled by key before building and pushed after (default: "
        "$RUNNER_CACHE_REMOTE); pulled ones are verified byte for byte. Credentials come from the "
        "store's usual environment/profiles (e.g. AWS_PROFILE, AWS_ENDPOINT_URL), never the URL",
    )


def load(args: argparse.Namespace) -> Any:
    from runner import api

    return api.load(
        args.recipe,
        overrides=args.overrides,
        cache_dir=args.cache_dir,
        cache_remote=args.cache_remote,
        targets=getattr(args, "targets", ()),
        pinned=bool(getattr(args, "locked", False) or getattr(args, "check", False)),
    )


def console(stderr: bool = False) -> Any:
    """A rich console on stdout, or on stderr as it is now: a step that sends library chatter from stderr to its
    log (`steps.quiet.chatter_to`) does not silence runner's own progress."""
    from rich.console import Console

    if not stderr:
        return Console(highlight=False, soft_wrap=True)
    try:  # the terminal itself, through a descriptor of its own
        stream: Any = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): that object
        stream = sys.stderr
    return Console(file=stream, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def short(key: str | None) -> str:
    return key[:12] if key else "-"
