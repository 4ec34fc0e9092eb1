"""The models a built recipe serves, for its `serve.engine`: its tuned, base and merged variants in transformers,
or its GGUF in llama.cpp (vLLM runs out of process: `vllm.command`). `runner serve` and `runner chat` start here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.errors import RunnerError
from runner.schema import Variant
from runner.serve import hf, llamacpp, vllm
from runner.serve.codec import Codec, end_ids
from runner.serve.engine import Engine

if TYPE_CHECKING:
    from runner.api import Build
    from runner.schema import ServeConfig
    from stores.cache import Artifact

# what each serve.engine honours of engine.OPTIONAL (the reference table in docs/serving.md is made from this)
SUPPORTS: dict[str, frozenset[str]] = {
    "transformers": hf.TransformersEngine.supports,
    "llama_cpp": llamacpp.LlamaCppEngine.supports,
    "vllm": vllm.SUPPORTS,
}


def load_models(build: Build, variants: list[Variant]) -> dict[str, Engine]:
    """The recipe's built model variants, by model id `RECIPE-VARIANT` (`RECIPE-gguf` for llama_cpp)."""
    r = build.loaded.recipe
    if r.model is None:
        raise RunnerError(f"{build.loaded.path} has no model: section to serve")
    if r.serve.engine == "llama_cpp":
        return {f"{build.loaded.name}-gguf": gguf_model(build)}
    return dict(transformers_models(build, variants))


def transformers_models(build: Build, variants: list[Variant]) -> dict[str, hf.TransformersEngine]:
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from peft import PeftModel
    from transformers import AutoTokenizer

    from runner.steps.models import base_dir, count_quantized, load_model, use_precision

    r = build.loaded.recipe
    assert r.model is not None  # load_models checked
    needed = ["tokenizer", "train"] + (["merge"] if "merged" in variants else [])
    arts = _built(build, needed + (["model.init"] if "model.init" in build.graph.nodes else []))
    tok = AutoTokenizer.from_pretrained(arts["tokenizer"].file("tokenizer"))
    tok.padding_side = "left"
    train = build.graph.nodes["train"]
    spec = r.model.model_copy(update={"revision": train.params.commit or r.model.revision})
    built = arts["model.init"].file("model") if "model.init" in arts else None
    precision = use_precision(r.model.precision)
    template = r.data.prompt.template if r.data else "plain"
    out = {}
    for variant in variants:
        if variant == "merged":
            model = load_model(arts["merge"].file("model"), precision)
        else:
            model = load_model(
                base_dir(spec, train.files, built), precision, trust_remote_code=r.model.trust_remote_code
            )
        quantized = count_quantized(model)[0] if precision in ("int8", "int4") else 0  # before LoRA wraps layers
        if variant == "tuned":
            model = PeftModel.from_pretrained(model, arts["train"].file("adapter"))
        model.eval()
        name = f"{build.loaded.name}-{variant}"
        codec = Codec(template, tok, context=hf.context_of(model), ends=end_ids(tok, model.generation_config))
        out[name] = hf.TransformersEngine(name, codec, model, precision=precision, quantized_layers=quantized)
    return out


def _built(build: Build, steps: list[str]) -> dict[str, Artifact]:
    """The artifacts of `steps`, each built (or a clear error saying what to do)."""
    have = build.built()
    for step in steps:
        if step in have:
            continue
        if step == "merge" and step not in build.graph.nodes:
            raise RunnerError(
                f"{build.loaded.path} has no merge step: add merged to serve.models (or set train.merge: true) "
                "and apply"
            )
        raise RunnerError(f"step {step} of {build.loaded.path} is not built: run `runner apply {build.loaded.path}`")
    return {step: have[step] for step in steps}


def gguf_model(build: Build) -> llamacpp.LlamaCppEngine:
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
    template = r.data.prompt.template if r.data else "plain"
    return llamacpp.load(f"{build.loaded.name}-gguf", gguf, have["merge"].file("model"), template, n_ctx=r.serve.n_ctx)


def attach_batchers(models: dict[str, Engine], config: ServeConfig) -> None:
    """Give each transformers or llama.cpp model a batcher (serve.batch_size > 1)."""
    if config.batch_size > 1:
        for model in models.values():
            if isinstance(model, hf.TransformersEngine | llamacpp.LlamaCppEngine) and model.batcher is None:
                model.attach_batcher(config.batch_size, config.batch_wait_ms / 1000)
