"""runner serve: an OpenAI-compatible HTTP server for the recipe's model (and document chat)."""

from __future__ import annotations

import argparse

from runner.cli.common import console, recipe_args


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve the recipe's model over an OpenAI-compatible HTTP API",
                       description="Endpoints: /v1/models, /v1/chat/completions and /v1/completions (stream: true for "
                                   "SSE), /v1/embeddings, and document chat as model NAME-VARIANT+docs when the recipe "
                                   "has an index. Requests are served one at a time per model (others queue). The "
                                   "recipe's serve: section sets host, port, variants, limits and the bearer token.",
                       epilog="example: runner serve recipes/quickstart.yaml --port 8000  then  "
                              "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x')")
    recipe_args(p)
    p.add_argument("--also", action="append", default=[], metavar="RECIPE",
                   help="serve this recipe's models too (side by side, picked by the request's model)")
    p.add_argument("--host", help="override serve.host")
    p.add_argument("--port", type=int, help="override serve.port")
    p.add_argument("--token", help="require this bearer token (default: $serve.token_env if set)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from runner import api
    from runner.cli.common import load

    builds = [load(args)] + [api.load(r, cache_dir=args.cache_dir, cache_remote=args.cache_remote) for r in args.also]
    app, config = api.serve_app(builds, token=args.token)
    host, port = args.host or config.host, args.port if args.port is not None else config.port
    console(stderr=True).print(f"serving on http://{host}:{port}/v1  (models: GET /v1/models)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
