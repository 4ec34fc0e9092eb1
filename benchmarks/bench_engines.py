"""Serving engines on the same model: runner's built-in (transformers, continuous batching) on the merged
quickstart model vs llama.cpp (`serve.engine: llama_cpp`) on its GGUF at f16 and q8_0, each behind `runner serve`
in its own process, 1 and 4 asyncio clients, greedy answers of exactly --max-tokens tokens. Prints tokens/s,
p50 and p99 per engine (median of --repeats runs) and each engine's ratio to the built-in one.

Needs the `gguf` extra and llama.cpp's converter (RUNNER_GGUF_CONVERTER, as in .ci/run).

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
from bench_batching import load, serve  # noqa: E402

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
                load(1, url, 2, args.max_tokens, model)  # warm-up
                for clients in (1, 4):
                    runs = [load(clients, url, args.seconds, args.max_tokens, model) for _ in range(args.repeats)]
                    results[(engine, clients)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
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


if __name__ == "__main__":
    main()
