"""A bounded loopback load test of `runner serve`, and the cost of streaming over HTTP against calling
`model.generate` directly, in one run, on the quickstart's tiny Falcon (built into a temp cache).

N clients send chat requests (half streamed) for T seconds; prints requests, errors, p50/p99 latency
and generated tokens/s. Then the same prompts one at a time: streamed through the server vs
`model.generate` in-process; target: streaming overhead <= 10%.

    python benchmarks/bench_serve.py [--clients 4] [--seconds 20] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of Spain?",
    "How many days does June have?",
    "What is 7 times 8?",
    "What is the opposite of 'hot'?",
    "Which day comes after Monday?",
    "How can I sleep better?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    import httpx
    import torch
    import uvicorn

    from runner import api

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "recipes", Path(tmp) / "recipes")  # a complete apply writes its lock beside it
        build = api.load(Path(tmp) / "recipes" / "quickstart.yaml", cache_dir=Path(tmp) / "cache")
        assert api.apply(build).ok
        app, _ = api.serve_app([build])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.05)

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
        t = time.perf_counter()
        for p in prompts:
            enc = model.tokenizer(p, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                model.model.generate(
                    **enc,
                    **model._kwargs(Sampling(max_tokens=args.max_tokens), threading.Event(), enc["input_ids"].shape[1]),
                )
        direct = time.perf_counter() - t
        with httpx.Client() as client:
            t = time.perf_counter()
            for i in range(len(prompts)):
                stream_call(client, i)
            streamed = time.perf_counter() - t
        server.should_exit = True
    print(
        f"{len(prompts)} generations: model.generate {direct:.2f} s, streamed over HTTP {streamed:.2f} s "
        f"-> overhead {100 * (streamed / direct - 1):+.1f}% (target <= 10%)"
    )


if __name__ == "__main__":
    main()
