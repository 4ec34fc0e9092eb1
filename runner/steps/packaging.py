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
    template: Literal["human_bot", "plain", "chat"] = Field(description="the prompt format, for the chat template")


@step("package", version="2", params=PackageParams, libs=("torch", "transformers", "peft", "safetensors"),
      reproducible=False)
def package(ctx: StepContext) -> None:
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
        script = ctx.files[p.package.gguf_converter]  # type: ignore[index]
        out = ctx.out / f"model-{p.package.gguf_type}.gguf"
        proc = subprocess.run([sys.executable, str(script), str(merged), "--outfile", str(out),
                               "--outtype", p.package.gguf_type], capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise StepError(f"GGUF conversion failed (the converter decides which architectures it supports):\n{tail}")
