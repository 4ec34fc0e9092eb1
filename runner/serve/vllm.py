"""`serve.engine: vllm` (GPU hosts): `runner serve` hands the merged model to vLLM's own OpenAI server, which
answers every request itself; runner's part is the command, with the recipe's limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.errors import RunnerError
from runner.serve.engine import OPTIONAL

if TYPE_CHECKING:
    from runner.api import Build

# vLLM's OpenAI server honours every parameter in OPTIONAL (and answers the rest itself)
SUPPORTS = frozenset(OPTIONAL)


def command(build: Build, host: str, port: int) -> list[str]:
    """The vLLM server to launch: the merged model, its name, the recipe's limits (its `--api-key`, given in
    VLLM_API_KEY, guards it as runner's token does)."""
    have = build.built()
    if "merge" not in have:
        raise RunnerError(
            f"serve.engine vllm serves the merged model: add merged to serve.models and apply {build.loaded.path}"
        )
    r = build.loaded.recipe
    cmd = [
        "vllm",
        "serve",
        str(have["merge"].file("model")),
        "--served-model-name",
        f"{build.loaded.name}-merged",
        "--host",
        host,
        "--port",
        str(port),
        "--max-num-seqs",
        str(r.serve.batch_size),
        "--generation-config",
        "vllm",
    ]
    if r.model is not None and r.model.precision in ("bf16", "fp16"):
        cmd += ["--dtype", {"bf16": "bfloat16", "fp16": "float16"}[r.model.precision]]
    return cmd
