"""Continuous batching in `runner serve`: throughput and latency at 1, 4 and 16 concurrent clients, served with
batching (serve.batch_size 16) and one request at a time (batch_size 1), the same model in one run: both
servers up at once, measured in turn.

The quickstart's tiny Falcon behind `runner serve` in its own process; greedy (or, with --temperature,
sampled) chat completions of at most
--max-tokens tokens (`min_tokens` holds the end-of-text token off, but the h2oGPT template's stop strings still
end most answers early: five of the six prompts answer in 9-11 tokens, one runs to 32), each client (asyncio,
in this process) sending requests back to back for --seconds. Tokens/s counts the tokens generated; the p99
latencies are those of the 32-token answers.
Prints requests, generated tokens/s, p50 and p99 latency per setting, and the ratios.
Target: >= 3x tokens/s at 16 clients, p99 at 16 clients no worse than 2x the single-client p99.

    python benchmarks/bench_batching.py [--seconds 10] [--max-tokens 32] [--repeats 3] [--temperature 0] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of Spain?",
    "How many days does June have?",
    "What is 7 times 8?",
    "What is the opposite of 'hot'?",
    "Which day comes after Monday?",
    "How can I sleep better?",
]


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def started(cmd: list[str], env: dict[str, str], base: str) -> subprocess.Popen:
    """A server process, once `base`/v1/models answers (its log in a file: a pipe nobody reads would fill and stall
    it; the log's end is the error if it does not start)."""
    import httpx

    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            httpx.get(f"{base}/v1/models", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    log.seek(0)
    raise RuntimeError(f"{' '.join(cmd[:4])} did not start: {log.read().decode(errors='replace')[-2000:]}")


def serve(recipe: Path, cache: str, batch_size: int, *sets: str) -> tuple[str, subprocess.Popen]:
    """`runner serve` in its own process, as users run it (so the load generator never shares its GIL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "runner", "serve", str(recipe), "--port", str(port), "--quiet"]
    for kv in (f"serve.batch_size={batch_size}", "serve.max_tokens=256", *sets):
        cmd += ["--set", kv]
    proc = started(cmd, {"RUNNER_CACHE": cache, "OMP_NUM_THREADS": "2"}, f"http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{port}/v1/chat/completions", proc


def chat(model: str, question: str, max_tokens: int, temperature: float = 0.0) -> dict[str, object]:
    """A chat completion request to `runner serve` of at most `max_tokens` tokens (`min_tokens` holds off the
    end-of-text token; a stop string of the template still ends the answer), greedy unless `temperature`."""
    messages = [{"role": "user", "content": question}]
    return {
        "model": model,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "messages": messages,
        "temperature": temperature,
    }


def drive(clients: int, seconds: float, one: Callable[[Any, str], Awaitable[None]]) -> float:
    """`clients` concurrent clients (asyncio, one thread, one httpx client), each awaiting `one(http, question)`
    for the prompts in turn, back to back, for `seconds`; the seconds it took."""
    import asyncio

    import httpx

    async def client(http: httpx.AsyncClient, c: int, stop: float) -> None:
        i = c
        while time.perf_counter() < stop:
            await one(http, PROMPTS[i % len(PROMPTS)])
            i += clients

    async def run() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            begun = time.perf_counter()
            await asyncio.gather(*(client(http, c, begun + seconds) for c in range(clients)))
            return time.perf_counter() - begun

    return asyncio.run(run())


def load(
    clients: int,
    url: str,
    seconds: float,
    max_tokens: int,
    model: str = "quickstart-tuned",
    body: Callable[[str, str, int], dict[str, object]] = chat,
) -> dict[str, float]:
    """`clients` concurrent clients (asyncio, one thread), each sending requests (`body(model, question,
    max_tokens)`) back to back for `seconds`."""
    latencies: list[float] = []
    tokens = [0]

    async def one(http: Any, question: str) -> None:
        t = time.perf_counter()
        r = await http.post(url, json=body(model, question, max_tokens))
        r.raise_for_status()
        latencies.append(time.perf_counter() - t)
        tokens[0] += r.json()["usage"]["completion_tokens"]

    wall = drive(clients, seconds, one)
    latencies.sort()
    return {
        "requests": len(latencies),
        "tokens_per_s": tokens[0] / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", help="runner's cache (default: a new one, so the quickstart is built first)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampled answers at this temperature (0: greedy)")
    args = ap.parse_args()
    from functools import partial

    from runner import api

    body = partial(chat, temperature=args.temperature)

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "quickstart.yaml"  # a copy: a complete apply writes its lock beside the recipe
        shutil.copytree(ROOT / "recipes", Path(tmp), dirs_exist_ok=True)
        cache = str(args.cache or Path(tmp) / "cache")
        assert api.apply(api.load(recipe, cache_dir=Path(cache))).ok
        results: dict[tuple[int, int], list[dict[str, float]]] = {}
        # both servers up at once, measured in turn (the order alternating), so a machine that slows down or
        # speeds up during the run weighs on both sides alike
        servers = {batch_size: serve(recipe, cache, batch_size) for batch_size in (1, 16)}
        try:
            for url, _ in servers.values():
                load(1, url, 2, args.max_tokens, body=body)  # warm-up
            for rep in range(args.repeats):
                for clients in (1, 4, 16):
                    for batch_size in (1, 16) if rep % 2 == 0 else (16, 1):
                        url = servers[batch_size][0]
                        results.setdefault((batch_size, clients), []).append(
                            load(clients, url, args.seconds, args.max_tokens, body=body)
                        )
        finally:
            for _, proc in servers.values():
                proc.terminate()
                proc.wait()
        results = dict(sorted(results.items()))
    print(f"{'batch':>5} {'clients':>7} {'requests':>8} {'tokens/s (median, min-max)':>28} {'p50 ms':>7} {'p99 ms':>7}")
    med = {}
    for (batch_size, clients), runs in results.items():
        tps = sorted(r["tokens_per_s"] for r in runs)
        med[(batch_size, clients)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m = med[(batch_size, clients)]
        print(
            f"{batch_size:>5} {clients:>7} {m['requests']:>8.0f} {m['tokens_per_s']:>10.0f} ({tps[0]:.0f}-{tps[-1]:.0f})"
            f"{'':>8} {m['p50'] * 1000:>7.0f} {m['p99'] * 1000:>7.0f}"
        )
    for clients in (1, 4, 16):
        print(
            f"{clients:>2} clients: batching / one at a time = "
            f"{med[(16, clients)]['tokens_per_s'] / med[(1, clients)]['tokens_per_s']:.2f}x tokens/s"
        )
    print(
        f"p99 at 16 clients with batching / single-client p99 = "
        f"{med[(16, 16)]['p99'] / med[(1, 1)]['p99']:.2f}x (target <= 2x); "
        f"tokens/s at 16 clients vs one at a time: {med[(16, 16)]['tokens_per_s'] / med[(1, 16)]['tokens_per_s']:.2f}x "
        "(target >= 3x)"
    )


if __name__ == "__main__":
    main()
