"""The package step: the tuned model in the forms people deploy: the adapter alone, the base with the
adapter merged (a Hugging Face directory, safetensors; the merge step's output, shared with serving),
and GGUF for llama.cpp / GPT4All.

The adapter directory describes itself: the tokenizer with a chat template is saved beside it, and its
`base_model_name_or_path` is the hub id and commit for hub bases, the resolved path for local ones, and
for a base built from a config (which exists nowhere else) the package's own `base/` copy, by its path in
this cache. So `peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` loads it as it is; after
moving a package to another machine, load `base/` and the adapter with `PeftModel.from_pretrained`.

GGUF is written by llama.cpp's own converter (`convert_hf_to_gguf.py`, named by `gguf_converter`),
run on the merged directory; which architectures it supports is the converter's to say, and its
refusal is reported as is. Without a converter the step fails with what to do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, model_validator

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.quiet import llama_cpp_quiet
from runner.steps.train_config import TrainParams

PackageFormat = Literal["adapter", "merged", "gguf"]


class PackageConfig(Params):
    """Which deployable forms of the tuned model to build."""

    formats: list[PackageFormat] = Field(
        default_factory=lambda: cast(list[PackageFormat], ["adapter", "merged"]), min_length=1
    )
    gguf_converter: str | None = Field(None, description="path to llama.cpp's convert_hf_to_gguf.py (for gguf)")
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "q4_K_M"] = Field(
        "f16",
        description="f32/f16/bf16/q8_0 are written by the converter; q4_K_M by llama.cpp's quantizer "
        "(llama-cpp-python) from f16",
    )

    @model_validator(mode="after")
    def _gguf_needs_converter(self) -> PackageConfig:
        if "gguf" in self.formats and self.gguf_converter is None:
            raise ValueError(
                "gguf needs gguf_converter: the path to llama.cpp's convert_hf_to_gguf.py; runner "
                "does not download it. It ships in llama-cpp-python's source distribution: `pip download "
                "llama-cpp-python --no-binary :all: --no-deps`, unpack it, and name "
                "vendor/llama.cpp/convert_hf_to_gguf.py"
            )
        return self

    def external_paths(self) -> dict[str, str]:
        return {"gguf_converter": self.gguf_converter} if self.gguf_converter else {}


class PackageParams(Params):
    train: TrainParams
    package: PackageConfig
    template: Literal["human_bot", "plain", "chat"] = Field(description="the prompt format, for the chat template")


@step(
    "package",
    version="3",
    params=PackageParams,
    libs=("torch", "transformers", "peft", "safetensors"),
    reproducible=False,
)
def package(ctx: StepContext) -> None:
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from runner.steps.models import BaseRef, save_tokenizer
    from runner.steps.trainer import base_path

    p: PackageParams = ctx.params
    if "adapter" in p.package.formats:
        adapter = ctx.out / "adapter"
        shutil.copytree(ctx.input("train").file("adapter"), adapter)
        save_tokenizer(ctx.input("tokenizer").file("tokenizer"), adapter, p.template)
        spec = p.train.model
        if isinstance(spec.base, BaseRef):  # a model built from a config exists nowhere else: bundle it
            shutil.copytree(ctx.input("model.init").file("model"), ctx.out / "base")
            name, revision = str(ctx.final_out / "base"), None
        elif spec.is_local():
            name, revision = str(base_path(ctx, p.train)), None
        else:
            name, revision = str(spec.base), p.train.commit or spec.revision
        config = json.loads((adapter / "adapter_config.json").read_text())
        config.update(base_model_name_or_path=name, revision=revision)
        (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    merged = ctx.input("merge").file("model") if "merge" in ctx.input_names else None
    if "merged" in p.package.formats:
        shutil.copytree(merged, ctx.out / "merged")  # type: ignore[arg-type]
    if "gguf" in p.package.formats:
        out = ctx.out / f"model-{p.package.gguf_type}.gguf"
        convert(ctx.files[p.package.gguf_converter], merged, out, p.package.gguf_type)  # type: ignore[index, arg-type]
        ctx.metrics["gguf"] = check_gguf(ctx.files[p.package.gguf_converter], out, merged)  # type: ignore[index, arg-type]


def convert(script: Path, merged: Path, out: Path, kind: str) -> None:
    """llama.cpp's converter (through `runner.steps.gguf`); q4_K_M is quantized from f16 by llama.cpp itself."""
    first = out.with_name("model-f16.gguf.tmp") if kind == "q4_K_M" else out
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.steps.gguf",
            str(script),
            str(merged),
            str(first),
            "f16" if kind == "q4_K_M" else kind,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not first.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise StepError(f"GGUF conversion failed (the converter decides which architectures it supports):\n{tail}")
    if kind == "q4_K_M":
        llama_cpp = llama_cpp_quiet()
        if llama_cpp is None:
            raise StepError(
                "gguf_type q4_K_M needs llama.cpp's quantizer: pip install 'runner[gguf]' (llama-cpp-python)"
            )
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        if llama_cpp.llama_model_quantize(str(first).encode(), str(out).encode(), params) != 0:
            raise StepError("llama.cpp could not quantize the model to q4_K_M")
        first.unlink()


PROMPTS = [
    "<human>: What is the capital of France?\n<bot>:",
    "<human>: Tell me a story about a dog.\n<bot>:",
    "The quick brown fox",
    "<human>: How do I bake bread?\n<bot>:",
]


def check_gguf(script: Path, path: Path, merged: Path, tokens: int = 16) -> dict[str, Any]:
    """What the GGUF holds (its tensors and their types), and, when llama-cpp-python is installed, whether
    llama.cpp runs it: its tokenizer against transformers', and greedy tokens against transformers' on the
    same prompt ids (a share: quantized types may part on near ties)."""
    from runner.steps.gguf import read_gguf

    sys.path.insert(0, str(script.parent / "gguf-py"))
    try:
        from gguf import GGMLQuantizationType  # llama.cpp's names of its tensor types
    finally:
        sys.path.remove(str(script.parent / "gguf-py"))
    _, tensors = read_gguf(path)
    kinds = sorted({GGMLQuantizationType(kind).name for _, kind in tensors})
    facts: dict[str, Any] = {"file": path.name, "tensors": len(tensors), "tensor_types": kinds}
    llama_cpp = llama_cpp_quiet()
    if llama_cpp is None:
        facts["llama_cpp_check"] = "not run: llama-cpp-python is not installed (pip install 'runner[gguf]')"
        return facts
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0)
    same_tokens = agree = total = 0
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        same_tokens += llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        ref, seq = [], list(ids)
        with torch.no_grad():  # greedy by hand: the arg-max every step, end-of-text included, as llama.cpp does
            for _ in range(tokens):
                ref.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
                seq.append(ref[-1])
        got = []
        for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            got.append(int(t))
            if len(got) == tokens:
                break
        agree += sum(a == b for a, b in zip(got, ref, strict=False))
        total += tokens
    facts.update(
        {
            "llama_cpp_check": "ran",
            "prompts": len(PROMPTS),
            "tokenizer_agrees": same_tokens == len(PROMPTS),
            "greedy_agreement": round(agree / total, 4),
        }
    )
    return facts
