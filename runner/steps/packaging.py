"""The package step: the tuned model in the forms people deploy: the adapter alone, the base with the
adapter merged (a Hugging Face directory, safetensors), and GGUF for llama.cpp / GPT4All.

GGUF is written by llama.cpp's own converter (`convert_hf_to_gguf.py`, named by `gguf_converter`),
run on the merged directory; which architectures it supports is the converter's to say, and its
refusal is reported as is. Without a converter the step fails with what to do.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Literal

from pydantic import Field, model_validator

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.training import TrainParams


class PackageConfig(Params):
    """Which deployable forms of the tuned model to build."""

    formats: list[Literal["adapter", "merged", "gguf"]] = Field(default_factory=lambda: ["adapter", "merged"], min_length=1)
    gguf_converter: str | None = Field(None, description="path to llama.cpp's convert_hf_to_gguf.py (for gguf)")
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "f16"

    @model_validator(mode="after")
    def _gguf_needs_converter(self) -> PackageConfig:
        if "gguf" in self.formats and self.gguf_converter is None:
            raise ValueError("gguf needs gguf_converter: the path to llama.cpp's convert_hf_to_gguf.py "
                             "(runner does not download it)")
        return self

    def external_paths(self) -> dict[str, str]:
        return {"gguf_converter": self.gguf_converter} if self.gguf_converter else {}


class PackageParams(Params):
    train: TrainParams
    package: PackageConfig


@step("package", version="1", params=PackageParams, libs=("torch", "transformers", "peft", "safetensors"),
      reproducible=False)
def package(ctx: StepContext) -> None:
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from peft import PeftModel
    from transformers import AutoTokenizer

    from runner.steps.models import load_model, use_precision
    from runner.steps.trainer import base_name, base_path

    p: PackageParams = ctx.params
    adapter = ctx.input("train").file("adapter")
    if "adapter" in p.package.formats:
        shutil.copytree(adapter, ctx.out / "adapter")
    if "merged" in p.package.formats or "gguf" in p.package.formats:
        precision = use_precision(p.train.model.precision, merge=True)
        model = load_model(base_path(ctx, p.train), precision, trust_remote_code=p.train.model.trust_remote_code)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.config._name_or_path = base_name(p.train)
        merged.save_pretrained(ctx.out / "merged", safe_serialization=True)
        AutoTokenizer.from_pretrained(ctx.input("tokenizer").file("tokenizer")).save_pretrained(ctx.out / "merged")
    if "gguf" in p.package.formats:
        script = ctx.files[p.package.gguf_converter]  # type: ignore[index]
        out = ctx.out / f"model-{p.package.gguf_type}.gguf"
        proc = subprocess.run([sys.executable, str(script), str(ctx.out / "merged"), "--outfile", str(out),
                               "--outtype", p.package.gguf_type], capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise StepError(f"GGUF conversion failed (the converter decides which architectures it supports):\n{tail}")
        if "merged" not in p.package.formats:
            shutil.rmtree(ctx.out / "merged")
