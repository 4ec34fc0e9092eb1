"""A bounded loopback load test of `runner serve`, and the cost of streaming over HTTP against calling
`model.generate` directly, in one run, on the quickstart's tiny Falcon (built into a temp cache). The server
runs in its own process, as users run it (a client in the server's process would share its GIL).

N clients send chat requests (half streamed) for T seconds; prints requests, errors, p50/p99 latency
and generated tokens/s. Then the same answers one at a time, --repeat rounds of the six prompts, each answer from
every side in turn (rotated, a 20 ms pause before each): `model.generate` in-process, whole and streamed
(transformers' TextIteratorStreamer, read by the caller; generation on one kept thread, its best setting), against
whole answers and streams through the server, the streams read by httpx and, to split the server's part from the
client's, as raw socket bytes. Overhead: the median round-by-round ratio, with quartiles; target: serving
overhead <= 10%.

    python benchmarks/bench_serve.py [--clients 4] [--seconds 20] [--max-tokens 32] [--repeat 15] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import PROMPTS, serve

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=15, help="rounds of the overhead comparison (six answers each)")
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

            def stream_call(client: httpx.Client, i: int, text: bool = False) -> Any:
                """The stream's content pieces counted (or, with `text`, joined)."""
                pieces: list[str] = []
                with client.stream("POST", url, json=body(i, True), timeout=120) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                            pieces.append(json.loads(line[6:])["choices"][0]["delta"]["content"] if text else "")
                return "".join(pieces) if text else len(pieces)

            def raw_stream(i: int) -> bytes:
                """The stream's bytes read off a socket, nothing parsed: the server's part of a stream without
                the client's (httpx's work per event shares the two cores with the model)."""
                import socket
                from urllib.parse import urlsplit

                where, payload = urlsplit(url), json.dumps(body(i, True)).encode()
                head = f"POST {where.path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
                with socket.create_connection((where.hostname, where.port)) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                    got = b""
                    while not got.endswith(b"\r\n0\r\n\r\n") and (chunk := sock.recv(65536)):
                        got += chunk
                assert got.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in got, got[-300:]
                return got

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

            # the same answers one at a time: in-process transformers vs through the server, whole and streamed
            from transformers import TextIteratorStreamer

            from runner.serve.engine import Sampling
            from runner.serve.hf import TransformersEngine
            from runner.serve.thread import model_thread

            model = api.model(build, variant="tuned")
            assert isinstance(model, TransformersEngine)
            prompts = [model.codec.prompt([{"role": "user", "content": p}]) for p in PROMPTS]
            # in-process generation on one thread kept for it, as the server keeps one (torch starts an OpenMP
            # team per calling thread: a new thread per answer measured 2.2x slower, and a second thread that
            # ran torch once, 2x; this is its best setting): runner's model thread, the one this process has
            worker = model_thread()

            def generate(i: int, streamer: object = None) -> None:
                enc = model.codec.tokenizer(prompts[i], return_tensors="pt", add_special_tokens=False)
                kw = model.generate_kwargs(
                    Sampling(max_tokens=args.max_tokens), threading.Event(), enc["input_ids"].shape[1]
                )
                with torch.inference_mode():  # its best setting, as the server's (no_grad measured 7-9% slower a step)
                    model.model.generate(**enc, **kw, streamer=streamer)

            def direct(i: int) -> None:
                worker.submit(generate, i).result()

            def direct_streamed(i: int) -> None:  # transformers' own way to stream, read by the caller
                streamer = TextIteratorStreamer(model.codec.tokenizer, skip_prompt=True, skip_special_tokens=True)
                job = worker.submit(generate, i, streamer)
                for _ in streamer:
                    pass
                job.result()

            sides = {
                "model.generate": direct,
                "model.generate streamed": direct_streamed,
                "whole answers over HTTP": lambda i: client.post(url, json=body(i, False), timeout=120).json(),
                "streamed over HTTP": lambda i: stream_call(client, i),
                "streamed, read raw": raw_stream,
            }
            names = list(sides)
            rounds: dict[str, list[float]] = {side: [] for side in sides}
            with httpx.Client() as client:
                for i in range(len(prompts)):  # warm-up, and the same answer from the server, whole and streamed
                    for side in names:
                        sides[side](i)
                    alone = model.generate(prompts[i], Sampling(max_tokens=args.max_tokens)).text
                    whole = sides["whole answers over HTTP"](i)["choices"][0]["message"]["content"]
                    assert whole == stream_call(client, i, text=True) == alone, (whole, alone)
                for rep in range(args.repeat):  # each answer from each side in turn, in a rotated order
                    spent = dict.fromkeys(sides, 0.0)
                    for i in range(len(prompts)):
                        k = (rep * len(prompts) + i) % len(names)
                        for side in names[k:] + names[:k]:
                            # a pause first: the side before may leave its OpenMP threads spinning for a while
                            # (in another process, the server's or this one's), and back to back, the next side
                            # paid for it. In rotation each side mostly follows the same one: without the pause
                            # in-process streaming measured 3-6% faster than plain generate, with it 4% slower
                            time.sleep(0.02)
                            t = time.perf_counter()
                            sides[side](i)
                            spent[side] += time.perf_counter() - t
                    for side in sides:
                        rounds[side].append(spent[side])
        finally:
            server.terminate()
            server.wait()
    print(
        f"{len(prompts)} answers per round, {args.repeat} rounds, one answer at a time; "
        "median (min-max) per round, and the overhead against the in-process side it does the work of:"
    )
    against = {
        "whole answers over HTTP": "model.generate",
        "streamed over HTTP": "model.generate streamed",
        "streamed, read raw": "model.generate streamed",
    }
    for side, times in rounds.items():
        line = f"  {side:24s} {statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f})"
        for base in dict.fromkeys([against[side], "model.generate"]) if side in against else []:
            line += f"\n      vs {base}: {overhead(times, rounds[base])} (target <= 10%)"
        print(line)


def overhead(times: list[float], base: list[float]) -> str:
    """The median of round-by-round ratios (each round's answers against the same answers in-process, run
    beside them, so drift in the machine's speed cancels) with its quartiles, and the ratio of the medians."""
    ratios = [t / b for t, b in zip(times, base, strict=False)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    mid = statistics.median(ratios)
    ratio_of_medians = statistics.median(times) / statistics.median(base)
    return (
        f"{100 * (mid - 1):+.1f}% (quartiles {100 * (q1 - 1):+.1f}% to {100 * (q3 - 1):+.1f}%), "
        f"ratio of medians {100 * (ratio_of_medians - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
