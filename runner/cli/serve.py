"""runner serve: an OpenAI-compatible HTTP server for the recipe's model (and document chat)."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from runner.cli.common import console, recipe_args


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the recipe's model over an OpenAI-compatible HTTP API",
        description="Endpoints: /v1/models, /v1/chat/completions and /v1/completions (stream: true for "
        "SSE), /v1/embeddings, /v1/search, and document chat as model NAME-VARIANT+docs when "
        "the recipe has an index (a recipe with only an index serves embeddings and search). "
        "Greedy requests to one model share continuous batches (serve.batch_size); sampled, "
        "seeded and logprobs requests run one at a time. The recipe's serve: section sets "
        "host, port, variants, limits and the bearer token. Each request is logged to stderr "
        "(method, path, status, latency, tokens; never bodies). With the ui extra, a chat page at / on the "
        "same port (serve.ui; the token, if any, is its sign-in password).",
        epilog="example: RUNNER_SERVE_TOKEN=secret runner serve recipes/quickstart.yaml --port 8000  "
        "then  OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='secret')",
    )
    recipe_args(p)
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="RECIPE",
        help="serve this recipe's models too (side by side, picked by the request's model)",
    )
    p.add_argument("--host", help="override serve.host")
    p.add_argument("--port", type=int, help="override serve.port")
    p.add_argument(
        "--token",
        help="require this bearer token. Prefer $RUNNER_SERVE_TOKEN (or serve.token_env): "
        "a token on the command line is visible to every user in `ps`",
    )
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(run=run)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound (a port in use is a clear error)."""
    import errno

    from runner.errors import RunnerError

    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without it every
    # response's second write waits for the client's delayed ACK
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise RunnerError(f"port {port} on {host} is in use (another server?); choose one with --port") from None
        raise RunnerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from runner import api
    from runner.cli.common import load

    builds = [load(args)] + [api.load(r, cache_dir=args.cache_dir, cache_remote=args.cache_remote) for r in args.also]
    if builds[0].loaded.recipe.serve.engine == "vllm":
        return launch_vllm(builds[0], args)
    app, config = api.serve_app(builds, token=args.token)
    host, port = args.host or config.host, args.port if args.port is not None else config.port
    sock = listen(host, port)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("runner.serve").setLevel(logging.WARNING if args.quiet else logging.INFO)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    console(stderr=True).print(f"serving on {url}/v1  (models: GET /v1/models)")
    if app.page is not None:
        console(stderr=True).print(f"chat page: {url}/" + ("  (sign in with the token)" if app.token else ""))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10, timeout_keep_alive=15)
    )
    server.run(sockets=[sock])
    return 0


def launch_vllm(build: Any, args: argparse.Namespace) -> int:
    """serve.engine vllm: hand the merged model to vLLM's own OpenAI server (GPU hosts); the token travels in
    VLLM_API_KEY, never on the command line."""
    import os
    import shlex
    import shutil

    from runner.errors import RunnerError
    from runner.serve import vllm

    config = build.loaded.recipe.serve
    cmd = vllm.command(build, args.host or config.host, args.port if args.port is not None else config.port)
    if shutil.which(cmd[0]) is None:
        raise RunnerError(
            "serve.engine vllm needs vLLM (a GPU host with `pip install vllm`); it would run: " + shlex.join(cmd)
        )
    token = (
        args.token
        or os.environ.get("RUNNER_SERVE_TOKEN")
        or (os.environ.get(config.token_env) if config.token_env else None)
    )
    env = {**os.environ, **({"VLLM_API_KEY": token} if token else {})}
    console(stderr=True).print(f"launching: {shlex.join(cmd)}")
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached
