"""Dynamic batching in `runner serve`: throughput and latency at 1, 4 and 16 concurrent clients, served with
batching (serve.batch_size 16) and one request at a time (batch_size 1), the same model in one run.

The quickstart's tiny Falcon, greedy chat completions of exactly --max-tokens tokens each (the end-of-text
token is held off so every answer costs the same), each client sending requests back to back for --seconds.
Prints requests, generated tokens/s, p50 and p99 latency per setting, and the ratios.
Target: >= 3x tokens/s at 16 clients, p99 at 16 clients no worse than 2x the single-client p99.

    python benchmarks/bench_batching.py [--seconds 10] [--max-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is the capital of Spain?", "How many days does June have?", "What is 7 times 8?",
           "What is the opposite of 'hot'?", "Which day comes after Monday?", "How can I sleep better?"]


def serve(models: dict, batch_size: int) -> tuple[str, object]:
    import uvicorn

    from runner.server import create_app
    from runner.serving import ServeConfig

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(models, ServeConfig(max_tokens=256, batch_size=batch_size)),
                                           log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions", server


def load(clients: int, url: str, seconds: float, max_tokens: int) -> dict[str, float]:
    import httpx

    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    tokens = [0]

    def client(c: int) -> None:
        with httpx.Client(timeout=300) as http:
            i = c
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = http.post(url, json={"model": "quickstart-tuned", "max_tokens": max_tokens,
                                         "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)
                tokens[0] += r.json()["usage"]["completion_tokens"]
                i += clients

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "tokens_per_s": tokens[0] / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from runner import api
    from runner.serving import load_models

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        build = api.load(ROOT / "recipes" / "quickstart.yaml", cache_dir=tmp)
        assert api.apply(build).ok
        results: dict[tuple[int, int], list[dict[str, float]]] = {}
        for batch_size in (1, 16):
            models = load_models(build, ["tuned"])
            for m in models.values():
                plain = m._kwargs
                m._kwargs = lambda s, cancel, plain=plain: {**plain(s, cancel), "min_new_tokens": s.max_tokens}
            url, server = serve(models, batch_size)
            load(1, url, 2, args.max_tokens)  # warm-up
            for clients in (1, 4, 16):
                results[(batch_size, clients)] = [load(clients, url, args.seconds, args.max_tokens)
                                                  for _ in range(args.repeats)]
            server.should_exit = True
    print(f"{'batch':>5} {'clients':>7} {'requests':>8} {'tokens/s (median, min-max)':>28} {'p50 ms':>7} {'p99 ms':>7}")
    med = {}
    for (batch_size, clients), runs in results.items():
        tps = sorted(r["tokens_per_s"] for r in runs)
        med[(batch_size, clients)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m = med[(batch_size, clients)]
        print(f"{batch_size:>5} {clients:>7} {m['requests']:>8.0f} {m['tokens_per_s']:>10.0f} ({tps[0]:.0f}-{tps[-1]:.0f})"
              f"{'':>8} {m['p50'] * 1000:>7.0f} {m['p99'] * 1000:>7.0f}")
    for clients in (1, 4, 16):
        print(f"{clients:>2} clients: batching / one at a time = "
              f"{med[(16, clients)]['tokens_per_s'] / med[(1, clients)]['tokens_per_s']:.2f}x tokens/s")
    print(f"p99 at 16 clients with batching / single-client p99 = "
          f"{med[(16, 16)]['p99'] / med[(1, 1)]['p99']:.2f}x (target <= 2x); "
          f"tokens/s at 16 clients vs one at a time: {med[(16, 16)]['tokens_per_s'] / med[(1, 16)]['tokens_per_s']:.2f}x "
          "(target >= 3x)")


if __name__ == "__main__":
    main()
