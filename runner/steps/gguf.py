"""Run llama.cpp's own `convert_hf_to_gguf.py` on a merged model directory, as a subprocess:

    python -m runner.steps.gguf CONVERTER MODEL_DIR OUTFILE OUTTYPE

Two things are adjusted around it. The converter reads a model's config through transformers, which
today keeps some keys under new names (see `converter_config`). And llama.cpp names a BPE tokenizer's
pre-tokenizer by hashing the token ids its test string encodes to, so a tokenizer trained on the
recipe's data (a vocabulary of its own) is never in its table. Such a tokenizer splits text exactly as
GPT-2 does (byte-level, GPT-2's regex), so it is registered here as `gpt-2`, the name llama.cpp gives
that pre-tokenizer; any other unknown tokenizer is still refused, as the converter refuses it.
Everything else is the converter's own code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def converter_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the converter reads it (transformers' own dict), with the older keys its model classes
    still look up: GPT-NeoX's `rotary_pct` and `rotary_emb_base` (now `rope_parameters`), and Falcon's
    `num_kv_heads`, which transformers fills with the head count even when the model is multi-query (one)."""
    out = dict(config)
    rope = config.get("rope_parameters") or {}
    if config.get("model_type") == "gpt_neox":
        out.setdefault("rotary_pct", rope.get("partial_rotary_factor", 0.25))
        out.setdefault("rotary_emb_base", rope.get("rope_theta", 10000.0))
    if (
        config.get("model_type") == "falcon"
        and config.get("multi_query")
        and not config.get("new_decoder_architecture")
    ):
        out["num_kv_heads"] = 1
    return out


def splits_like_gpt2(model_dir: Path) -> bool:
    """Whether the tokenizer in `model_dir` pre-tokenizes as GPT-2 does: a bare byte-level pre-tokenizer using
    GPT-2's regex (what `tokenizers`' ByteLevel(use_regex=True) applies), no normalizer."""
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and (spec.get("model") or {}).get("type") == "BPE"
    )


def main(argv: list[str]) -> None:
    converter, model_dir, outfile, outtype = Path(argv[0]), Path(argv[1]), argv[2], argv[3]
    root = converter.parent
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    try:
        from conversion import base  # llama.cpp's own package, beside the converter
    except ImportError:  # an older single-file converter: run it as it is
        base = None
    if base is not None:
        patch(base)
    sys.argv = [str(converter), str(model_dir), "--outfile", outfile, "--outtype", outtype]
    import runpy

    runpy.run_path(str(converter), run_name="__main__")


def read_gguf(path: Path) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """A GGUF file's metadata and its tensors' (name, ggml type id), read by the format's specification. gguf-py's
    reader maps every string of the vocabulary separately: seconds on a 150k-token vocabulary, where this
    takes a fraction of one."""
    import struct

    import numpy as np

    data = path.read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    tensors, count = struct.unpack_from("<QQ", data, 8)
    pos = 24
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n : pos].decode("utf-8", errors="replace")

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            item, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item in (8, 9):
                return [value(item) for _ in range(n)]
            array = np.frombuffer(data, dtype="<" + scalars[item], count=n, offset=pos)
            pos += array.nbytes
            return array.tolist()
        (v,) = struct.unpack_from("<" + scalars[kind], data, pos)
        pos += struct.calcsize(scalars[kind])
        return v

    metadata: dict[str, Any] = {}
    for _ in range(count):
        key = string()
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        metadata[key] = value(kind)
    infos = []
    for _ in range(tensors):
        name = string()
        (dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * dims
        (ggml_type,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8  # the type, then the data offset
        infos.append((name, ggml_type))
    return metadata, infos


def patch(base: Any) -> None:
    original = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            if splits_like_gpt2(Path(self.dir_model)):
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    hparams = base.ModelBase.load_hparams
    base.ModelBase.load_hparams = staticmethod(lambda *a, **k: converter_config(hparams(*a, **k)))


if __name__ == "__main__":
    main(sys.argv[1:])
