"""How much memory one training process needs, estimated from the model's shape before anything is loaded
(`runner plan` says so, and warns when it will not fit this machine). No torch is imported.

The estimate adds up:
- weights: every parameter at the chosen precision (int8/int4 quantize the linear layers only; embeddings
  and the output layer stay in fp32, as bitsandbytes leaves them); on the CPU twice, as loading peaks;
- LoRA: its parameters in fp32 with their gradients and Adam's two moments (16 bytes each);
- activations kept for the backward pass: per layer and token about 17 x hidden + 2.5 x heads x seq_len
  values (Korthikanti et al., 2022, without recomputation; on a GPU the fused attention keeps no
  seq_len x seq_len scores, so the second term goes), and the logits with their float copy and gradient; in
  fp32 on the CPU whatever the precision (measured: bf16 saves little there), in 16 bits on a GPU;
- the runtime: Python with torch, transformers and peft loaded (measured on this project's tests).

The model's shape comes from its config: a `from_config` recipe's own numbers, a local directory's or the
Hugging Face cache's `config.json`; for a hub model that is not cached it is guessed from a size in its
name (`falcon-7b`: 7 billion parameters) and the estimate says so.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
RUNTIME_BYTES = 0.6 * GIB  # peak RSS of a 100k-parameter model's training run here: nearly all of it the libraries
# `lora.target_modules: auto` is PEFT's mapping, which names the query and value projections of every family the
# estimate knows (tests/test_memory.py holds it to PEFT's): PEFT is not imported here, plan stays light
PEFT_AUTO = frozenset({"q_proj", "v_proj", "query_key_value"})
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class Shape:
    architecture: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    source: str  # where the numbers came from


@dataclass(frozen=True)
class Estimate:
    weights: float
    lora: float
    activations: float
    runtime: float
    processes: int
    shape: Shape

    @property
    def per_process(self) -> float:
        return self.weights + self.lora + self.activations + self.runtime

    @property
    def total(self) -> float:
        return self.per_process * self.processes


def shape_from_config(config: dict[str, Any], source: str) -> Shape:
    """A transformers config.json (Falcon, GPT-NeoX, Llama and their kin) as the numbers the estimate needs."""
    arch = str(config.get("model_type", "llama"))
    hidden = int(config.get("hidden_size") or config.get("n_embd") or config["d_model"])
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    if arch == "falcon" and config.get("multi_query", True) and not config.get("new_decoder_architecture"):
        kv = 1
    else:
        kv = int(config.get("num_key_value_heads") or config.get("num_kv_heads") or heads)
    inter = int(config.get("intermediate_size") or config.get("ffn_hidden_size") or 4 * hidden)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or config["num_layers"])
    return Shape(
        arch,
        int(config.get("vocab_size", 50_000)),
        hidden,
        layers,
        heads,
        kv,
        inter,
        bool(config.get("tie_word_embeddings", arch == "falcon")),
        source,
    )


def shape_from_name(name: str) -> Shape | None:
    """A guess for a model known only by its hub id: the parameter count in its name, a typical layout for it."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*([bm])\b", name.lower().replace("-", " ").replace("_", " "))
    if m is None:
        return None
    params = float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6)
    hidden = int(round((params * 142 / 12) ** (1 / 3) / 64) * 64) or 64  # params ~ 12 L h^2 with L ~ h / 142
    layers = max(1, round(params / (12 * hidden * hidden)))
    heads = max(1, hidden // 64)
    return Shape(
        "unknown",
        65_000,
        hidden,
        layers,
        heads,
        heads,
        4 * hidden,
        True,
        f"a guess from the name {name!r} (the model is not in the local Hugging Face cache)",
    )


def model_shape(spec: Any, tokenizer_vocab: int | None, base_dir: Path | None) -> Shape | None:
    """The base model's shape, from whatever is at hand without loading it."""
    from runner.steps.models import BaseRef

    if isinstance(spec.base, BaseRef):
        fc = spec.base.from_config
        return Shape(
            fc.architecture,
            tokenizer_vocab or 50_000,
            fc.hidden_size,
            fc.layers,
            fc.heads,
            1 if fc.architecture == "falcon" else fc.heads,
            fc.intermediate_size or 4 * fc.hidden_size,
            fc.architecture == "falcon",
            "the recipe's from_config",
        )
    if base_dir is not None and (base_dir / "config.json").is_file():
        return shape_from_config(json.loads((base_dir / "config.json").read_text()), f"{base_dir}/config.json")
    return shape_from_name(str(spec.base))


def _modules(s: Shape) -> dict[str, tuple[int, int]]:
    """Each linear layer of one block: (in, out)."""
    kv = s.kv_heads * (s.hidden // s.heads)
    if s.architecture == "llama":
        return {
            "q_proj": (s.hidden, s.hidden),
            "k_proj": (s.hidden, kv),
            "v_proj": (s.hidden, kv),
            "o_proj": (s.hidden, s.hidden),
            "gate_proj": (s.hidden, s.intermediate),
            "up_proj": (s.hidden, s.intermediate),
            "down_proj": (s.intermediate, s.hidden),
        }
    return {
        "query_key_value": (s.hidden, s.hidden + 2 * kv),
        "dense": (s.hidden, s.hidden),
        "dense_h_to_4h": (s.hidden, s.intermediate),
        "dense_4h_to_h": (s.intermediate, s.hidden),
    }


def estimate(
    s: Shape,
    *,
    precision: str,
    rank: int,
    targets: list[str] | str,
    seq_len: int,
    batch: int,
    processes: int = 1,
    gpu: bool = False,
) -> Estimate:
    modules = _modules(s)
    linear = s.layers * sum(i * o for i, o in modules.values())
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    weights = linear * BYTES[precision] + embeddings * (4.0 if precision in ("int8", "int4") else BYTES[precision])
    weights *= 1 if gpu else 2
    named = PEFT_AUTO if targets == "auto" else set(modules if targets == "all-linear" else targets)
    chosen = {k: v for k, v in modules.items() if k in named}
    lora_params = s.layers * rank * sum(i + o for i, o in chosen.values())
    tokens = seq_len * batch
    per_layer = 17 * s.hidden + (0 if gpu else 2.5 * s.heads * seq_len)
    act_bytes = 2.0 if gpu and precision in ("bf16", "fp16") else 4.0
    activations = tokens * (s.layers * per_layer * act_bytes + 3 * s.vocab * 4.0)
    return Estimate(weights, lora_params * 16.0, activations, RUNTIME_BYTES, processes, s)


@functools.cache
def machine_memory() -> dict[str, float]:
    """This machine's RAM and, when `nvidia-smi` is there to say, each GPU's memory (bytes)."""
    out = {"ram": float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            text = subprocess.run(
                [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            sizes = [float(x) * 1024**2 for x in text.split()]
            if sizes:
                out["gpu"] = min(sizes)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return out


def verdict(e: Estimate, machine: dict[str, float]) -> tuple[str, bool]:
    """One line for `runner plan`, and whether it fits."""
    parts = (
        f"weights {e.weights / GIB:.2f}, LoRA + optimizer {e.lora / GIB:.2f}, activations "
        f"{e.activations / GIB:.2f}, runtime {e.runtime / GIB:.2f}"
    )
    each = f" per process, {e.total / GIB:.1f} GiB for {e.processes}" if e.processes > 1 else ""
    line = f"train needs about {e.per_process / GIB:.1f} GiB{each} ({parts}; shape: {e.shape.source})"
    if "gpu" in machine:
        fits = e.per_process - e.runtime <= machine["gpu"]
        return f"{line}; each GPU has {machine['gpu'] / GIB:.1f} GiB" + ("" if fits else ": it will not fit"), fits
    fits = e.total <= machine["ram"]
    return f"{line}; this machine has {machine['ram'] / GIB:.1f} GiB RAM" + ("" if fits else ": it will not fit"), fits
