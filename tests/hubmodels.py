"""Users' models, offline: each family's real tokenizer and chat template with its real config scaled down
(random weights, seeded), written as the Hugging Face hub cache lays a download out
(`hub/models--ORG--NAME/snapshots/SHA`, `refs/main`).

The tokenizers and templates are llama.cpp's own test files, vendored in llama-cpp-python's source distribution
(`vendor/llama.cpp/models/ggml-vocab-*.gguf`, `models/templates/*.jinja`): transformers turns a vocab GGUF into a
fast tokenizer (`gguf_file=`); GPT-NeoX, which it cannot read, is built from the GGUF's tokens and merges with the
tokenizers library. Where the conversion loses a setting of the real tokenizer.json (Falcon's pre-tokenizer, the
sentencepiece prefix space of Llama 2 and Mistral, Llama 3's `ignore_merges` and BOS), it is put back; `vectors_disagree` checks every tokenizer
against llama.cpp's `.inp`/`.out` test vectors. Sentencepiece families get the `tokenizer.model` llama.cpp's
converter reads, rebuilt from the GGUF's tokens, scores and types.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# llama.cpp's tree inside the sdist: where RUNNER_GGUF_CONVERTER (its convert_hf_to_gguf.py) lies, as .ci/run sets it
CONVERTER = os.environ.get("RUNNER_GGUF_CONVERTER", "/tmp/llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp/x.py")
MODELS = Path(CONVERTER).parent / "models"
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


@dataclass(frozen=True)
class Family:
    """One family as a user names it: its hub id, llama.cpp's vocab and template files, and its real config and
    generation config (the fields that matter; widths scaled down by SMALL)."""

    repo: str
    vocab: str
    template: str | None
    config: dict[str, Any]
    generation: dict[str, Any] = field(default_factory=dict)
    special: dict[str, str] = field(default_factory=dict)  # the real tokenizer_config's special tokens
    spm: bool = False  # a sentencepiece vocab: llama.cpp's converter reads tokenizer.model
    vectors: str = ""  # the vocab whose test vectors check it (default: its own)

    @property
    def checked_by(self) -> str:
        return self.vectors or self.vocab


FAMILIES = {
    "llama3": Family(
        "meta-llama/Llama-3.2-1B-Instruct",
        "llama-bpe",
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "num_key_value_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-05,
            "tie_word_embeddings": True,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "vocab_size": 128256,
        },
        {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "qwen2.5": Family(
        "Qwen/Qwen2.5-0.5B-Instruct",
        "qwen2",
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "num_key_value_heads": 2,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-06,
            "tie_word_embeddings": True,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "vocab_size": 151936,
        },
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643},
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
    "mistral": Family(
        "mistralai/Mistral-7B-Instruct-v0.2",
        "llama-spm",
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "num_key_value_heads": 2,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-05,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "vocab_size": 32000,
        },
        {"bos_token_id": 1, "eos_token_id": 2},
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        spm=True,
    ),
    "phi3": Family(
        "microsoft/Phi-3.5-mini-instruct",
        "phi-3",
        "microsoft-Phi-3.5-mini-instruct.jinja",
        {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "num_key_value_heads": 4,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "rms_norm_eps": 1e-05,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 32000,
            "pad_token_id": 32000,
            "vocab_size": 32064,
        },
        {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000},
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
        spm=True,
    ),
    "falcon": Family(
        "tiiuae/falcon-7b",
        "falcon",
        None,
        {
            "architectures": ["FalconForCausalLM"],
            "model_type": "falcon",
            "multi_query": True,
            "num_kv_heads": 1,
            "parallel_attn": True,
            "bias": False,
            "new_decoder_architecture": False,
            "alibi": False,
            "bos_token_id": 11,
            "eos_token_id": 11,
            "vocab_size": 65024,
            "ffn_hidden_size": 256,  # 4 x hidden, as Falcon-7B has it and llama.cpp's falcon graph assumes
        },
        {"bos_token_id": 11, "eos_token_id": 11},
        {"eos_token": "<|endoftext|>"},
    ),
    "gpt_neox": Family(
        "h2oai/h2ogpt-oasst1-512-12b",
        "gpt-neox",
        None,
        {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "rotary_pct": 0.25,
            "use_parallel_residual": True,
            "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-05,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "vocab_size": 50688,
        },
        {"bos_token_id": 0, "eos_token_id": 0},
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        vectors="mpt",  # MPT's tokenizer is GPT-NeoX-20B's: the same GGUF vocab, with llama.cpp's test vectors
    ),
}
# the byte-level vocabularies built here from tokens and merges, and their split pattern (transformers' GGUF table)
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BYTE_LEVEL: dict[str, str | None] = {
    "llama-bpe": _WORDS + r"\p{N}{1,3}" + _REST,
    "qwen2": _WORDS + r"\p{N}" + _REST,
    "gpt-neox": None,
}
NOT_COVERED = {
    "gemma": "transformers cannot read ggml-vocab-gemma-4.gguf (its GGUF config's per-layer num_key_value_heads)",
}


def available() -> bool:
    return MODELS.is_dir()


def vectors(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for a vocab: (text, token ids), as tests/test-tokenizer-0.cpp reads them."""
    texts = (MODELS / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (MODELS / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").splitlines()
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, ids, strict=False)]


def vectors_disagree(tok: Any, vocab: str) -> list[str]:
    """The texts of llama.cpp's test vectors that `tok` tokenizes otherwise."""
    return [text for text, ids in vectors(vocab) if tok.encode(text, add_special_tokens=False) != ids]


def gguf_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's metadata (gguf-py's reader takes seconds on a large vocabulary)."""
    from runner.steps.gguf import read_gguf

    return read_gguf(path)[0]


def tokenizer(family: Family) -> Any:
    """The family's fast tokenizer from llama.cpp's vocab GGUF, with the real tokenizer's special tokens."""
    from tokenizers import Regex, normalizers, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if family.vocab in BYTE_LEVEL:
        tok = PreTrainedTokenizerFast(tokenizer_object=_bpe_from_gguf(MODELS / f"ggml-vocab-{family.vocab}.gguf"))
    else:
        tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=f"ggml-vocab-{family.vocab}.gguf")
    backend = tok.backend_tokenizer
    if family.vocab == "llama-bpe":  # Llama 3's tokenizer.json: a word in the vocab is one token, and BOS opens
        backend.model.ignore_merges = True
        bos = "<|begin_of_text|>"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
        )
    if family.vocab == "falcon":  # Falcon-7B's tokenizer.json pre-tokenizer; the GGUF keeps only its name
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Punctuation("contiguous"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), "isolated"),
            ]
        )
    if family.vocab == "llama-spm":  # sentencepiece's dummy prefix, as Llama 2's and Mistral's tokenizer.json have it
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    for name, value in family.special.items():
        setattr(tok, name, value)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if family.template:
        tok.chat_template = (MODELS / "templates" / family.template).read_text(encoding="utf-8")
    return tok


def _bpe_from_gguf(path: Path) -> Any:
    """A byte-level BPE tokenizer from a GGUF's tokens and merges, with the pre-tokenizer its `tokenizer.ggml.pre`
    names (as transformers' GGUF conversion builds it; that conversion reads the file with gguf-py, which takes
    seconds, and knows no gptneox vocabulary)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    meta = gguf_metadata(path)
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    pattern = BYTE_LEVEL[path.name.removeprefix("ggml-vocab-").removesuffix(".gguf")]
    if pattern is None:  # GPT-NeoX-20B: NFC, then GPT-2's byte-level split
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]  # 3: control (special), 4: user defined (GPT-NeoX's space runs)
    tok.add_special_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == 3])
    tok.add_tokens([AddedToken(t, normalized=True) for t, kind in zip(tokens, types, strict=True) if kind == 4])
    return tok


def sentencepiece_model(vocab: str) -> bytes:
    """A sentencepiece `tokenizer.model` from a GGUF's tokens, scores and token types (llama.cpp's converter reads
    sentencepiece vocabularies only from that file)."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    meta = gguf_metadata(MODELS / f"ggml-vocab-{vocab}.gguf")
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    # GGUF token types are sentencepiece's: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte; a
    # GGUF marks padding ids unknown too (Phi-3's [PAD...]), where sentencepiece allows one unknown piece
    unknown = types.index(2)
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, float(score), 5 if kind == 2 and i != unknown else int(kind)
    return bytes(proto.SerializeToString())


def snapshot_dir(hf_home: Path, repo: str, commit: str) -> Path:
    """Where the hub cache in `hf_home` holds model `repo` at `commit`."""
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def write_snapshot(hf_home: Path, name: str, *, seed: int = 0) -> tuple[str, Path]:
    """The family `name` as a download of its hub id in `hf_home`'s hub cache: (commit, snapshot directory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[name]
    tok = tokenizer(family)
    config = dict(family.config)
    config["vocab_size"] = max(config["vocab_size"], len(tok))  # Llama 3's vocab holds one token past its config
    settings = {**SMALL, **{k: v for k, v in config.items() if k not in ("architectures", "model_type")}}
    # random weights wider than an untrained model's 0.02: its next-token scores are then not near-ties, which
    # float error (transformers against llama.cpp) would break either way
    settings["initializer_range"] = 0.2
    cfg = AutoConfig.for_model(config["model_type"], **settings)
    cfg.architectures = config["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    commit = hashlib.sha1(f"{family.repo}:{seed}".encode()).hexdigest()
    snapshot = snapshot_dir(hf_home, family.repo, commit)
    repo = snapshot.parent.parent
    model.save_pretrained(snapshot, safe_serialization=True)
    GenerationConfig(**family.generation).save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    if family.spm:
        (snapshot / "tokenizer.model").write_bytes(sentencepiece_model(family.vocab))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit, snapshot
