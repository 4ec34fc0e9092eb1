"""Models: where a base model comes from, how it loads at a precision, which modules LoRA targets.

A base is a Hugging Face id (resolved to a commit and fetched into the normal HF cache: `hub.py`),
a local directory, or `from_config` (a small falcon / gpt_neox / llama built with seeded
random init). Weights load from safetensors only; `trust_remote_code` is off unless the
recipe turns it on. int8/int4 use bitsandbytes, and quantization is checked, not assumed:
Falcon's `FalconLinear` layers are skipped by `from_pretrained` on this bitsandbytes
version, so they are swapped by hand, and a load that quantized nothing is an error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from runner.params import Params
from runner.registry import StepError

Precision = Literal["fp32", "bf16", "fp16", "int8", "int4"]
Architecture = Literal["falcon", "gpt_neox", "llama"]


class FromConfig(Params):
    """A model built from a config with seeded random init (no download): for tests, demos and CI."""

    architecture: Architecture
    hidden_size: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int | None = Field(None, description="MLP width (default 4 x hidden_size)")
    max_positions: int = Field(2048, ge=16)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> FromConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


class BaseRef(Params):
    from_config: FromConfig


class TrainTokenizer(Params):
    """Train a byte-level BPE tokenizer on the recipe's training text."""

    vocab_size: int = Field(2000, ge=64)
    min_frequency: int = Field(2, ge=1)


class TokenizerRef(Params):
    train: TrainTokenizer | None = None
    path: str | None = Field(None, description="a local tokenizer directory")

    DIR_FIELDS = frozenset({"path"})

    @model_validator(mode="after")
    def _one(self) -> TokenizerRef:
        if (self.train is None) == (self.path is None):
            raise ValueError("give exactly one of `train:` or `path:`")
        return self

    def external_paths(self) -> dict[str, str]:
        return {"path": self.path} if self.path else {}


class ModelSpec(Params):
    """The base model and how it is loaded. A local directory is written as a path (`./models/x`)."""

    DIR_FIELDS = frozenset({"base"})

    base: str | BaseRef = Field(description="Hugging Face id, local directory, or {from_config: {...}}")
    revision: str = Field("main", description="hub revision (branch, tag or commit)")
    tokenizer: TokenizerRef | None = Field(None, description="default: the base model's own tokenizer")
    precision: Precision = "fp32"
    trust_remote_code: bool = Field(False, description="run model code from the hub (off by default)")

    @model_validator(mode="after")
    def _config_needs_tokenizer(self) -> ModelSpec:
        if isinstance(self.base, BaseRef) and self.tokenizer is None:
            raise ValueError(
                "a from_config model has no tokenizer of its own: set tokenizer: {train: {...}} or {path: ...}"
            )
        return self

    def is_local(self) -> bool:
        """A local directory is written as a path (./dir, ../dir, /abs, ~/dir); anything else is a hub id."""
        return isinstance(self.base, str) and self.base.startswith((".", "/", "~"))

    def external_paths(self) -> dict[str, str]:
        return {"base": self.base} if isinstance(self.base, str) and self.is_local() else {}


def base_dir(spec: ModelSpec, files: dict[str, Path], built: Path | None) -> Path:
    """The directory holding the base weights: a from_config artifact, a local dir, or the HF cache snapshot of the
    resolved commit (downloaded now if `apply` has not fetched it)."""
    from runner.steps.hub import HubError, fetch_model, missing_message, offline

    if isinstance(spec.base, BaseRef):
        assert built is not None
        return built
    if spec.is_local():
        return files[spec.base]
    if not re.fullmatch(r"[0-9a-f]{40}", spec.revision):  # not resolved: offline, or no hub, and not in the cache
        why = "HF_HUB_OFFLINE is set" if offline() else "the hub could not be reached"
        raise StepError(missing_message("model", spec.base, spec.revision, why))
    try:
        return fetch_model(spec.base, spec.revision)
    except HubError as exc:
        raise StepError(str(exc)) from None


def build_config(fc: FromConfig, vocab_size: int, bos: int | None, eos: int | None) -> Any:
    from transformers import FalconConfig, GPTNeoXConfig, LlamaConfig

    inter = fc.intermediate_size or 4 * fc.hidden_size
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": fc.hidden_size,
        "num_hidden_layers": fc.layers,
        "num_attention_heads": fc.heads,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if fc.architecture == "falcon":
        # Falcon-7B's layout: multi-query attention, parallel attention/MLP, no biases
        # (num_kv_heads=1 says multi-query in the field llama.cpp's converter reads; transformers reads multi_query)
        return FalconConfig(
            **common,
            multi_query=True,
            num_kv_heads=1,
            parallel_attn=True,
            bias=False,
            new_decoder_architecture=False,
            ffn_hidden_size=inter,
            max_position_embeddings=fc.max_positions,
        )
    if fc.architecture == "gpt_neox":
        return GPTNeoXConfig(**common, intermediate_size=inter, max_position_embeddings=fc.max_positions)
    return LlamaConfig(
        **common, intermediate_size=inter, num_key_value_heads=fc.heads, max_position_embeddings=fc.max_positions
    )


def torch_dtype(precision: Precision) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def use_precision(precision: Precision, *, merge: bool = False) -> Precision:
    """The precision a tuned model is used at: the one it was trained at (int8/int4 stay quantized for
    evaluation and serving, as QLoRA does); merging needs dequantized weights, so a quantized base is merged
    in fp32."""
    return "fp32" if merge and precision in ("int8", "int4") else precision


def load_model(path: Path, precision: Precision, *, trust_remote_code: bool = False) -> Any:
    """Load a causal LM from safetensors at `precision`; int8/int4 are verified to be quantized."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "local_files_only": True,
        "dtype": torch_dtype(precision),
    }
    if precision in ("int8", "int4"):
        check_bitsandbytes(precision)
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if precision == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        )
        kwargs["dtype"] = torch.float32
        kwargs["device_map"] = {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise StepError(
            f"could not load a model from {path} ({str(exc).splitlines()[0]}); weights must be "
            "safetensors (pickled .bin weights are refused)"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise StepError(
                f"{path} needs custom code from the hub; set model.trust_remote_code: true if you trust it"
            ) from None
        raise
    if precision in ("int8", "int4"):
        swap_unquantized_linears(model, precision)
        n, left = count_quantized(model)
        if n == 0 or left:
            raise StepError(
                f"{precision} quantization did not take: {n} quantized layers, {len(left)} linear layers "
                f"left unquantized (e.g. {left[:3]})"
            )
        if precision == "int8":
            copy_int8_outputs(model)
    return model


def copy_int8_outputs(model: Any) -> None:
    """bitsandbytes' int8 layers return a view made by their own autograd Function, which autograd forbids to
    change in place; Falcon adds the attention to its MLP's output in place, so training with LoRA on
    `query_key_value` alone (PEFT's targets) fails there. Each int8 layer hands on a copy instead."""
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            module.register_forward_hook(lambda _m, _i, out: out.clone())


def check_bitsandbytes(precision: Precision) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # bitsandbytes raises assorted errors on hardware it does not support
        raise StepError(
            f"precision {precision} needs bitsandbytes, which does not load here ({exc}); "
            "use fp32 or bf16 on this machine"
        ) from None


def _is_plain_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and type(module).__module__.split(".")[0] != "bitsandbytes"


def swap_unquantized_linears(model: Any, precision: Precision) -> int:
    """Quantize Linear layers `from_pretrained` left alone (Falcon's FalconLinear); the LM head stays."""
    import bitsandbytes as bnb
    import torch

    device = next(model.parameters()).device
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_plain_linear(child) or name == "lm_head":
                continue
            bias = child.bias is not None
            new: torch.nn.Module
            if precision == "int8":
                new = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
                )
                new.weight = bnb.nn.Int8Params(
                    child.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False
                )
            else:
                if child.in_features % 32 or child.out_features % 32:
                    raise StepError(
                        f"int4 needs layer widths divisible by 32; {name} is {child.in_features}x{child.out_features}"
                    )
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=bias, compute_dtype=torch.float32, quant_type="nf4"
                )
                new.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False, quant_type="nf4")
            if bias:
                new.bias = torch.nn.Parameter(child.bias.data.float(), requires_grad=False)
            setattr(parent, name, new.to(device))
            swapped += 1
    return swapped


def count_quantized(model: Any) -> tuple[int, list[str]]:
    """(number of bitsandbytes layers, names of Linear layers still unquantized, the LM head excepted)."""
    n = 0
    left = []
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            n += 1
        elif _is_plain_linear(module) and not name.endswith("lm_head"):
            left.append(name)
    return n, left


def lora_targets(model: Any, requested: list[str] | Literal["auto", "all-linear"]) -> list[str] | str:
    """The modules LoRA wraps: `auto` is what PEFT itself picks for the model type (its own mapping), and
    `all-linear` (PEFT's every linear layer but the output head) for a type PEFT has no mapping for."""
    model_type = getattr(model.config, "model_type", "")
    if requested == "auto":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

        return list(PEFT_TARGETS.get(model_type, [])) or "all-linear"
    if requested == "all-linear":
        return requested
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in requested if t not in names]
    if missing:
        raise StepError(
            f"LoRA target modules {missing} are not in this {model_type} model; it has e.g. {sorted(names)[:12]}"
        )
    return list(requested)


def save_tokenizer(source: Path, dest: Path, template: str) -> None:
    """The training tokenizer saved beside a packaged model, with a chat template that prompts the model as
    runner trained it (`human_bot`, `plain`); a `chat` recipe's tokenizer keeps the template it has."""
    from transformers import AutoTokenizer

    from runner.steps.prompts import CHAT_TEMPLATES

    tok = AutoTokenizer.from_pretrained(source)
    if template in CHAT_TEMPLATES:
        tok.chat_template = CHAT_TEMPLATES[template]
    tok.save_pretrained(dest)
    keep_sentencepiece(source, dest)


def keep_sentencepiece(source: Path, dest: Path) -> None:
    """Copy a sentencepiece `tokenizer.model` that `save_pretrained` of a fast tokenizer leaves behind: llama.cpp's
    converter reads a sentencepiece vocabulary (Llama 2, Mistral, Phi-3) only from it."""
    import shutil

    if (source / "tokenizer.model").is_file() and not (dest / "tokenizer.model").exists():
        shutil.copyfile(source / "tokenizer.model", dest / "tokenizer.model")
