"""Serving engines on the same model: runner's built-in (transformers, continuous batching) on the merged
quickstart model vs llama.cpp (`serve.engine: llama_cpp`) on its GGUF at f16 and q8_0, each behind `runner serve`
in its own process, and the same GGUF files in llama.cpp's own OpenAI server (llama-cpp-python's
`llama_cpp.server`, on all cores as runner's engine runs it), 1 and 4 asyncio clients, greedy answers of up to
--max-tokens tokens: the end-of-text token is held off on every side (`min_tokens`; llama.cpp's server gets
`logit_bias`) and every side stops at the template's stop strings (its server is sent the prompt runner would
build and those strings), so most answers end there, before --max-tokens. Tokens are each server's own count.
Prints tokens/s, p50 and p99 per engine (median of --repeats runs) and each engine's ratio to the built-in one.

Needs the `gguf` extra, llama.cpp's converter (RUNNER_GGUF_CONVERTER, as in .ci/run) and, for llama.cpp's own
server, the `bench` extra (its server's packages).

    python benchmarks/bench_engines.py [--seconds 6] [--max-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import free_port, load, serve, started

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    converter = os.environ.get("RUNNER_GGUF_CONVERTER")
    if not converter:
        sys.exit("set RUNNER_GGUF_CONVERTER to llama.cpp's convert_hf_to_gguf.py (see .ci/run)")
    from runner import api

    engines = {
        "transformers (merged, fp32)": ("quickstart-merged", ["serve.models=[merged]"]),
        "llama.cpp f16": ("quickstart-gguf", ["serve.engine=llama_cpp", "package.gguf_type=f16"]),
        "llama.cpp q8_0": ("quickstart-gguf", ["serve.engine=llama_cpp", "package.gguf_type=q8_0"]),
    }
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "recipes", tmp, dirs_exist_ok=True)
        recipe = Path(tmp) / "quickstart.yaml"
        recipe.write_text(recipe.read_text() + f"package: {{formats: [merged, gguf], gguf_converter: {converter}}}\n")
        cache = Path(tmp) / "cache"
        for _, sets in engines.values():
            assert api.apply(api.load(recipe, cache_dir=cache, overrides=sets)).ok
        for engine, (model, sets) in engines.items():
            url, proc = serve(recipe, str(cache), 16, *sets)
            try:
                results.update(measure(engine, url, model, args))
            finally:
                proc.terminate()
                proc.wait()
        for gguf_type in ("f16", "q8_0"):
            build = api.load(
                recipe, cache_dir=cache, overrides=["serve.engine=llama_cpp", f"package.gguf_type={gguf_type}"]
            )
            url, proc, body = llama_server(build, gguf_type)
            try:
                results.update(measure(f"llama.cpp's server {gguf_type}", url, "gguf", args, body))
            finally:
                proc.terminate()
                proc.wait()
    print(f"{'engine':<28} {'clients':>7} {'tokens/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'vs built-in':>11}")
    for (engine, clients), m in results.items():
        base = results[("transformers (merged, fp32)", clients)]["tokens_per_s"]
        print(
            f"{engine:<28} {clients:>7} {m['tokens_per_s']:>9.0f} {m['p50'] * 1000:>7.0f} {m['p99'] * 1000:>7.0f} "
            f"{m['tokens_per_s'] / base:>10.2f}x"
        )
    for gguf_type in ("f16", "q8_0"):
        for clients in (1, 4):
            ours, theirs = (
                results[(f"llama.cpp {gguf_type}", clients)],
                results[(f"llama.cpp's server {gguf_type}", clients)],
            )
            print(
                f"{gguf_type}, {clients} client(s): runner serve (llama.cpp engine) / llama.cpp's server = "
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s"
            )


def measure(engine: str, url: str, model: str, args: argparse.Namespace, *body: object) -> dict:
    load(1, url, 2, args.max_tokens, model, *body)  # type: ignore[arg-type]  # warm-up
    out = {}
    for clients in (1, 4):
        runs = [load(clients, url, args.seconds, args.max_tokens, model, *body) for _ in range(args.repeats)]  # type: ignore[arg-type]
        out[(engine, clients)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return out


def llama_server(build: object, gguf_type: str) -> tuple[str, object, object]:
    """llama.cpp's own server on the package's GGUF (threads and context as runner's engine sets them), and the
    request that asks it what runner's server is asked: the prompt runner renders, greedy, no end-of-text token,
    ended at the template's stop strings or N tokens."""
    from transformers import AutoTokenizer

    from runner.steps.prompts import render_prompt

    have = build.built()  # type: ignore[attr-defined]
    recipe = build.loaded.recipe  # type: ignore[attr-defined]
    tok = AutoTokenizer.from_pretrained(have["merge"].file("model"))
    port, cores = free_port(), str(os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(have["package"].file(f"model-{gguf_type}.gguf"))]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(recipe.serve.n_ctx)]
    cmd += ["--n_threads", cores, "--n_threads_batch", cores, "--verbose", "false"]
    proc = started(cmd, {}, f"http://127.0.0.1:{port}")
    template = recipe.data.prompt.template

    def body(model: str, question: str, max_tokens: int) -> dict[str, object]:
        prompt = render_prompt(template, [{"role": "user", "content": question}], tok)
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stop": ["<human>:", "<bot>:"] if template == "human_bot" else [],
            "logit_bias": {str(tok.eos_token_id): -100.0},
            "logit_bias_type": "input_ids",
        }

    return f"http://127.0.0.1:{port}/v1/completions", proc, body


if __name__ == "__main__":
    main()
