"""A bounded loopback load test of `runner serve`, and the cost of streaming over HTTP against calling
`model.generate` directly, in one run, on the quickstart's tiny Falcon (built into a temp cache). The server
runs in its own process, as users run it (a client in the server's process would share its GIL).

N clients send chat requests (half streamed) for T seconds; prints requests, errors, p50/p99 latency
and generated tokens/s. Then the same prompts one at a time: `model.generate` in-process vs whole answers and
streams through the server, --repeat passes each, interleaved (each round in a rotated order), median and
spread; target: serving overhead <= 10%.

    python benchmarks/bench_serve.py [--clients 4] [--seconds 20] [--max-tokens 32] [--repeat 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import PROMPTS, serve  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="passes of each side of the overhead comparison")
    ap.add_argument("--cache", help="runner's cache (default: a new one, so the quickstart is built first)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override for the server")
    args = ap.parse_args()
    import httpx
    import torch

    from runner import api

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "recipes", Path(tmp) / "recipes")  # a complete apply writes its lock beside it
        recipe = Path(tmp) / "recipes" / "quickstart.yaml"
        cache = Path(args.cache or Path(tmp) / "cache")
        build = api.load(recipe, cache_dir=cache)
        assert api.apply(build).ok
        url, server = serve(recipe, str(cache), 16, *args.set)  # serve's default batch size
        try:

            def body(i: int, stream: bool) -> dict:
                return {
                    "model": "quickstart-tuned",
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": args.max_tokens,
                    "stream": stream,
                }

            def stream_call(client: httpx.Client, i: int) -> int:
                pieces = 0
                with client.stream("POST", url, json=body(i, True), timeout=120) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        pieces += line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line
                return pieces

            latencies: list[float] = []
            tokens = errors = 0
            lock = threading.Lock()
            deadline = time.time() + args.seconds

            def client_loop(c: int) -> None:
                nonlocal tokens, errors
                with httpx.Client() as client:
                    i = c
                    while time.time() < deadline:  # bounded in time; loopback only
                        started = time.perf_counter()
                        try:
                            if i % 2:
                                n = stream_call(client, i)
                            else:
                                r = client.post(url, json=body(i, False), timeout=120)
                                r.raise_for_status()
                                n = r.json()["usage"]["completion_tokens"]
                        except httpx.HTTPError:
                            with lock:
                                errors += 1
                            continue
                        with lock:
                            latencies.append(time.perf_counter() - started)
                            tokens += n
                        i += args.clients

            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(client_loop, range(args.clients)))
            wall = time.perf_counter() - started
            latencies.sort()
            p50 = statistics.median(latencies)
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            print(
                f"{args.clients} clients x {args.seconds:.0f} s: {len(latencies)} requests, {errors} errors, "
                f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, {tokens / wall:.0f} generated tokens/s"
            )

            # streaming through HTTP vs model.generate in-process, same prompts, one at a time
            from runner.served import load_models
            from runner.serving import Sampling

            model = next(iter(load_models(build, ["tuned"]).values()))
            prompts = [model.prompt([{"role": "user", "content": p}]) for p in PROMPTS] * 3

            def direct_pass() -> float:
                t = time.perf_counter()
                for p in prompts:
                    enc = model.tokenizer(p, return_tensors="pt", add_special_tokens=False)
                    with torch.no_grad():
                        model.model.generate(
                            **enc,
                            **model._kwargs(
                                Sampling(max_tokens=args.max_tokens), threading.Event(), enc["input_ids"].shape[1]
                            ),
                        )
                return time.perf_counter() - t

            def http_pass(client: httpx.Client, stream: bool) -> float:
                t = time.perf_counter()
                for i in range(len(prompts)):
                    if stream:
                        stream_call(client, i)
                    else:
                        client.post(url, json=body(i, False), timeout=120).raise_for_status()
                return time.perf_counter() - t

            passes: dict[str, list[float]] = {
                "model.generate": [],
                "whole answers over HTTP": [],
                "streamed over HTTP": [],
            }
            with httpx.Client() as client:
                http_pass(client, True)  # warm-up
                sides = list(passes)
                for rep in range(args.repeat):  # interleaved, each pass in a rotated order
                    for side in sides[rep % 3 :] + sides[: rep % 3]:
                        if side == "model.generate":
                            passes[side].append(direct_pass())
                        else:
                            passes[side].append(http_pass(client, side.startswith("streamed")))
        finally:
            server.terminate()
            server.wait()
    gen_s = statistics.median(passes["model.generate"])
    print(f"{len(prompts)} generations per pass, median (min-max) of {args.repeat} passes, one at a time:")
    for side, times in passes.items():
        med = statistics.median(times)
        overhead = "" if side == "model.generate" else f" -> overhead {100 * (med / gen_s - 1):+.1f}% (target <= 10%)"
        print(f"  {side:24s} {med:.2f} s ({min(times):.2f}-{max(times):.2f}){overhead}")


if __name__ == "__main__":
    main()
