"""The models a built recipe serves: its tuned, base and merged variants in transformers, its GGUF in
llama.cpp, or the command that serves its merged model in vLLM. `runner serve` and `runner chat` start here."""

from __future__ import annotations

from typing import Any

from runner.errors import RunnerError
from runner.schema import Variant
from runner.serving import Model


def load_models(build: Any, variants: list[Variant]) -> dict[str, Model]:
    """The recipe's built model variants, by model id `RECIPE-VARIANT`."""
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from peft import PeftModel
    from transformers import AutoTokenizer

    from runner.steps.models import base_dir, count_quantized, load_model, use_precision

    r = build.loaded.recipe
    if r.model is None:
        raise RunnerError(f"{build.loaded.path} has no model: section to serve")
    if r.serve.engine == "llama_cpp":
        return {f"{build.loaded.name}-gguf": gguf_model(build)}
    needed = ["tokenizer", "train"] + (["merge"] if "merged" in variants else [])
    arts = {}
    have = build.built()
    for step in needed + (["model.init"] if "model.init" in build.graph.nodes else []):
        art = have.get(step)
        if art is None:
            if step == "merge" and step not in build.graph.nodes:
                raise RunnerError(
                    f"{build.loaded.path} has no merge step: add merged to serve.models (or set "
                    "train.merge: true) and apply"
                )
            raise RunnerError(
                f"step {step} of {build.loaded.path} is not built: run `runner apply {build.loaded.path}`"
            )
        arts[step] = art
    tok = AutoTokenizer.from_pretrained(arts["tokenizer"].file("tokenizer"))
    tok.padding_side = "left"
    spec = r.model.model_copy(update={"revision": build.graph.nodes["train"].params.commit or r.model.revision})
    built = arts["model.init"].file("model") if "model.init" in arts else None
    precision = use_precision(r.model.precision)
    out = {}
    for variant in variants:
        if variant == "merged":
            model = load_model(arts["merge"].file("model"), precision)
        else:
            model = load_model(
                base_dir(spec, build.graph.nodes["train"].files, built),
                precision,
                trust_remote_code=r.model.trust_remote_code,
            )
        quantized = count_quantized(model)[0] if precision in ("int8", "int4") else 0  # before LoRA wraps layers
        if variant == "tuned":
            model = PeftModel.from_pretrained(model, arts["train"].file("adapter"))
        model.eval()
        name = f"{build.loaded.name}-{variant}"
        out[name] = Model(
            name,
            r.data.prompt.template if r.data else "plain",
            model,
            tok,
            precision=precision,
            quantized_layers=quantized,
        )
    return out


def gguf_model(build: Any) -> Model:
    from runner.llama_engine import load

    r = build.loaded.recipe
    if r.package is None or "gguf" not in r.package.formats:
        raise RunnerError(
            f"serve.engine llama_cpp serves the package's GGUF: add package: {{formats: [gguf], ...}} to "
            f"{build.loaded.path} and apply"
        )
    have = build.built()
    if "package" not in have or "merge" not in have:
        raise RunnerError(f"the package of {build.loaded.path} is not built: run `runner apply {build.loaded.path}`")
    gguf = have["package"].file(f"model-{r.package.gguf_type}.gguf")
    name = f"{build.loaded.name}-gguf"
    return load(
        name, gguf, have["merge"].file("model"), r.data.prompt.template if r.data else "plain", n_ctx=r.serve.n_ctx
    )


def vllm_command(build: Any, host: str, port: int) -> list[str]:
    """The vLLM server `serve.engine: vllm` launches on a GPU host: the merged model, its name, the recipe's limits
    (vLLM's OpenAI server; its `--api-key` guards it as runner's token does)."""

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
