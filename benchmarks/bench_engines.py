"""Serving engines on the same model, against llama.cpp's own C++ server: runner's built-in engine (transformers,
continuous batching) on the merged quickstart model, and runner's llama.cpp engine (`serve.engine: llama_cpp`,
continuous batching over llama.cpp sequences) on its GGUF at f16 and q8_0, each behind `runner serve` in its own
process, against `llama-server` (built from the llama.cpp source in llama-cpp-python's sdist:
benchmarks/llama_server.py) on the same GGUF files with `--parallel 16` (continuous batching), all on all cores.

1, 4 and 16 asyncio clients each stream requests back to back for --seconds (the six prompts of
bench_batching, greedy, at most --max-tokens tokens; the end-of-text token held off on every side: `min_tokens`
for runner, `logit_bias` for llama-server, which is sent the prompt runner renders; every side stops at the
template's stop strings; a new connection per request). Per engine and concurrency, the median of --repeats runs of: generated tokens/s (each
server's own count, from the stream's usage), time to first token and inter-token latency (the gaps between a
stream's chunks) at p50 and p99, and whole-request latency at p99 - the figures vLLM's serving benchmark
reports. Targets (issue 31): the llama.cpp engine within 10% of llama-server's tokens/s at every concurrency;
the built-in engine's request p99 at 16 clients <= 2x a lone client's.

Needs the `gguf` extra, RUNNER_GGUF_CONVERTER (as in .ci/run), cmake and a C++ compiler (llama-server's build,
once).

    python benchmarks/bench_engines.py [--seconds 6] [--max-tokens 32] [--repeats 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_server
from bench_batching import drive, free_port, serve, started

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = (1, 4, 16)
Body = Callable[[str, int], dict[str, Any]]


def stream_load(clients: int, url: str, seconds: float, max_tokens: int, body: Body) -> dict[str, float]:
    """`clients` concurrent clients (asyncio, one thread), each streaming requests back to back for `seconds`."""
    import httpx

    ttft: list[float] = []
    gaps: list[float] = []
    latency: list[float] = []
    tokens = [0]

    async def one(http: httpx.AsyncClient, question: str) -> None:
        sent = time.perf_counter()
        chunks: list[float] = []
        # a new connection per request on every side: llama-server (cpp-httplib) ends a kept-alive connection
        # after 5 requests without saying so, and the next request on it finds it closed
        async with http.stream("POST", url, json=body(question, max_tokens), headers={"connection": "close"}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens[0] += event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        chunks.append(time.perf_counter())
        latency.append(time.perf_counter() - sent)
        if chunks:
            ttft.append(chunks[0] - sent)
            gaps.extend(b - a for a, b in itertools.pairwise(chunks))

    wall = drive(clients, seconds, one)

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "requests": len(latency),
        "tokens_per_s": tokens[0] / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "itl_p50": pct(gaps, 0.5),
        "itl_p99": pct(gaps, 0.99),
        "latency_p99": pct(latency, 0.99),
    }


def runner_body(model: str) -> Body:
    def body(question: str, max_tokens: int) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    return body


def llama_server_body(build: Any, prompt_cache: bool = True) -> Body:
    """What runner's server is asked, asked of llama-server: the prompt runner renders, greedy, no end-of-text
    token, ended at the template's stop strings or N tokens."""
    from transformers import AutoTokenizer

    from runner.steps.prompts import render_prompt

    tok = AutoTokenizer.from_pretrained(build.built()["merge"].file("model"))
    template = build.loaded.recipe.data.prompt.template

    def body(question: str, max_tokens: int) -> dict[str, Any]:
        return {
            "prompt": render_prompt(template, [{"role": "user", "content": question}], tok),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stop": ["<human>:", "<bot>:"] if template == "human_bot" else [],
            "logit_bias": {str(tok.eos_token_id): -100.0},
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_prompt": prompt_cache,
        }

    return body


def start_llama_server(binary: Path, gguf: Path, n_ctx: int) -> tuple[str, Any]:
    """llama-server on all cores, 16 slots of `n_ctx` positions each (runner's engines give every request the
    whole context too), continuous batching on (its default)."""
    port, cores = free_port(), str(os.cpu_count() or 1)
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", str(16 * n_ctx)]
    cmd += ["--parallel", "16", "-t", cores, "-tb", cores, "--no-webui", "--log-disable"]
    proc = started(cmd, {}, f"http://127.0.0.1:{port}")
    import httpx

    deadline = time.time() + 60  # /v1/models answers while the model still loads; /health says when it is ready
    while httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code != 200 and time.time() < deadline:
        time.sleep(0.2)
    return f"http://127.0.0.1:{port}/v1/completions", proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every side, e.g. model.base.from_config.hidden_size=1024 (a bigger model)",
    )
    ap.add_argument(
        "--no-prompt-cache",
        action="store_true",
        help="ask llama-server not to reuse a slot's KV cache for a prompt it saw before (runner has no prefix cache)",
    )
    args = ap.parse_args()
    binary = llama_server.build()
    converter = os.environ["RUNNER_GGUF_CONVERTER"]
    from runner import api

    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "recipes", tmp, dirs_exist_ok=True)
        recipe = Path(tmp) / "quickstart.yaml"
        recipe.write_text(recipe.read_text() + f"package: {{formats: [merged, gguf], gguf_converter: {converter}}}\n")
        cache = Path(tmp) / "cache"
        sides: dict[str, tuple[str, Any, Body]] = {}
        try:
            for name, sets, model in (
                ("runner, built-in engine (fp32)", ["serve.models=[merged]"], "quickstart-merged"),
                ("runner, llama.cpp engine, f16", ["serve.engine=llama_cpp", "package.gguf_type=f16"], None),
                ("runner, llama.cpp engine, q8_0", ["serve.engine=llama_cpp", "package.gguf_type=q8_0"], None),
            ):
                build = api.load(recipe, cache_dir=cache, overrides=[*args.sets, *sets])
                assert api.apply(build).ok
                url, proc = serve(recipe, str(cache), 16, *args.sets, *sets)
                sides[name] = (url, proc, runner_body(model or "quickstart-gguf"))
                if model is None:
                    gguf_type = sets[1].split("=")[1]
                    gguf = build.built()["package"].file(f"model-{gguf_type}.gguf")
                    url, proc = start_llama_server(binary, gguf, build.loaded.recipe.serve.n_ctx)
                    sides[f"llama-server, {gguf_type}"] = (
                        url,
                        proc,
                        llama_server_body(build, not args.no_prompt_cache),
                    )
            # every server up at once, measured in turn (the order rotating), so drift weighs on all alike
            for name, (url, proc, body) in sides.items():
                try:
                    stream_load(1, url, 2, args.max_tokens, body)  # warm-up
                except Exception as exc:
                    raise SystemExit(f"{name} ({url}) failed: {exc!r}; exit code {proc.poll()}") from exc
            names = list(sides)
            for rep in range(args.repeats):
                for clients in CLIENTS:
                    for name in names[rep % len(names) :] + names[: rep % len(names)]:
                        url, _, body = sides[name]
                        runs.setdefault((name, clients), []).append(
                            stream_load(clients, url, args.seconds, args.max_tokens, body)
                        )
        finally:
            for _, proc, _ in sides.values():
                proc.terminate()
                proc.wait()
    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in runs.items()}
    print(f"median of {args.repeats} x {args.seconds:g} s, at most {args.max_tokens} tokens, {os.cpu_count()} cores")
    print(f"recipe: the quickstart{' with ' + ', '.join(args.sets) if args.sets else ''}")
    print(f"llama-server's prompt cache: {'off' if args.no_prompt_cache else 'on (its default)'}")
    print(
        f"{'engine':<32} {'clients':>7} {'tokens/s (min-max)':>22} {'TTFT p50/p99 ms':>16} "
        f"{'ITL p50/p99 ms':>15} {'req p99 ms':>10}"
    )
    for (name, clients), m in sorted(med.items(), key=lambda kv: (list(sides).index(kv[0][0]), kv[0][1])):
        tps = sorted(r["tokens_per_s"] for r in runs[(name, clients)])
        print(
            f"{name:<32} {clients:>7} {m['tokens_per_s']:>8.0f} ({tps[0]:.0f}-{tps[-1]:.0f})"
            f"{m['ttft_p50'] * 1e3:>9.0f}/{m['ttft_p99'] * 1e3:<6.0f} {m['itl_p50'] * 1e3:>8.1f}/{m['itl_p99'] * 1e3:<6.1f}"
            f"{m['latency_p99'] * 1e3:>10.0f}"
        )
    for gguf_type in ("f16", "q8_0"):
        for clients in CLIENTS:
            ours, theirs = (
                med[(f"runner, llama.cpp engine, {gguf_type}", clients)],
                med[(f"llama-server, {gguf_type}", clients)],
            )
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            print(
                f"{gguf_type}, {clients:>2} clients: runner's llama.cpp engine / llama-server = {ratio:.2f}x tokens/s"
            )
    lone, busy = med[("runner, built-in engine (fp32)", 1)], med[("runner, built-in engine (fp32)", 16)]
    print(
        f"built-in engine: request p99 at 16 clients / at 1 = {busy['latency_p99'] / lone['latency_p99']:.2f}x (target <= 2x)"
    )


if __name__ == "__main__":
    main()
