"""Training steps: tokenizer, model.init (from_config), tokenize, train (LoRA/QLoRA), merge.

Tokenizing is its own step, so changing a training param never re-tokenises. The heavy
loop lives in `trainer.py` (also run by torchrun workers for `distributed.nproc > 1`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from typing import Any

from runner.registry import StepContext, StepError, step
from runner.steps.train_config import InitParams, MergeParams, TokenizeParams, TokenizerParams, TrainParams


@step("tokenizer", version="2", params=TokenizerParams, libs=("tokenizers", "transformers"))
def make_tokenizer(ctx: StepContext) -> None:
    """Train a byte-level BPE on the training text, or copy the given / the base model's tokenizer."""
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p: TokenizerParams = ctx.params
    out = ctx.out / "tokenizer"
    fast: Any
    if p.tokenizer is not None and p.tokenizer.train is not None:
        import duckdb
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from runner.steps.tables import open_input

        con = duckdb.connect()
        texts = [r[0] for r in con.execute(f"select text from {open_input(ctx, table='train')}").fetchall()]
        con.close()
        if not texts:
            raise StepError("no training rows to train a tokenizer on")
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = ["<|endoftext|>", "<|pad|>"]
        trainer = trainers.BpeTrainer(
            vocab_size=p.tokenizer.train.vocab_size,
            min_frequency=p.tokenizer.train.min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
        )
    else:
        from runner.steps.models import ModelSpec, base_dir

        source = (
            ctx.files[p.tokenizer.path]
            if p.tokenizer is not None and p.tokenizer.path
            else base_dir(ModelSpec(base=p.base or "", revision=p.commit or "main"), ctx.files, None)
        )
        try:
            fast = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise StepError(f"no tokenizer could be loaded from {source} ({exc})") from None
        if fast.pad_token is None:
            fast.pad_token = fast.eos_token
    fast.save_pretrained(out)
    if p.tokenizer is None or p.tokenizer.train is None:
        from runner.steps.models import keep_sentencepiece

        keep_sentencepiece(source, out)
    ctx.metrics["vocab_size"] = len(fast)


@step("model.init", version="2", params=InitParams, libs=("torch", "transformers", "safetensors"))
def init_model(ctx: StepContext) -> None:
    """A model from a config with seeded random init, saved as safetensors (no download)."""
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.steps.models import build_config

    p: InitParams = ctx.params
    tok = AutoTokenizer.from_pretrained(ctx.input("tokenizer").file("tokenizer"))
    config = build_config(p.from_config, len(tok), tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(p.from_config.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(ctx.out / "model", safe_serialization=True)
    ctx.metrics["parameters"] = sum(t.numel() for t in model.parameters())


@step("tokenize", version="2", params=TokenizeParams, libs=("duckdb", "tokenizers", "transformers"))
def tokenize(ctx: StepContext) -> None:
    """Token ids and labels for train and validation; packed if asked. The completion is learnt and the prompt
    masked (-100), but for a chat template's earlier assistant turns, learnt too (`chat_examples`)."""
    import duckdb
    import pyarrow as pa
    from transformers import AutoTokenizer

    from runner.steps.tables import open_input
    from stores.datastore import quote_path

    p: TokenizeParams = ctx.params
    tok = AutoTokenizer.from_pretrained(ctx.input("tokenizer").file("tokenizer"))
    con = duckdb.connect()
    try:
        for split in ("train", "validation"):
            source = open_input(ctx, "split", table=split)
            chat = "replies" in [d[0] for d in con.execute(f"select * from {source} limit 0").description]
            rows = con.execute(f"select prompt, completion{', replies' if chat else ''} from {source}").fetchall()
            examples = chat_examples(tok, rows) if chat else reply_examples(tok, rows)
            examples = [(ids[: p.seq_len], labels[: p.seq_len]) for ids, labels in examples]
            if p.packing:
                examples = pack(examples, p.seq_len)
            table = pa.table({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
            con.register("t", table)
            path = ctx.out / f"{split}.parquet"
            con.execute(f"copy (select * from t) to {quote_path(path)} (format parquet)")
            con.unregister("t")
            ctx.table(split, f"{split}.parquet", len(examples))
            ctx.metrics[f"{split}_tokens"] = sum(len(e[0]) for e in examples)
            ctx.metrics[f"{split}_label_tokens"] = sum(sum(1 for x in e[1] if x != -100) for e in examples)
    finally:
        con.close()


Example = tuple[list[int], list[int]]  # token ids and labels (-100: not learnt)


def reply_examples(tok: Any, rows: list[tuple[str, str]]) -> list[Example]:
    """`human_bot` and `plain`: the prompt and the completion tokenized apart (the reply's first token is the one
    a model generates after the prompt), the end-of-text token appended; the completion is learnt."""
    if not rows:
        return []
    prompts = tok([r[0] for r in rows], add_special_tokens=False)["input_ids"]
    replies = tok([r[1] for r in rows], add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id]
    return [(q + r + eos, [-100] * len(q) + r + eos) for q, r in zip(prompts, replies, strict=True)]


def chat_examples(tok: Any, rows: list[tuple[str, str, list[dict[str, int]]]]) -> list[Example]:
    """A chat template's text, tokenized whole (a sentencepiece tokenizer would put a word boundary at the start of
    a completion tokenized apart); learnt: the tokens of the completion and of the earlier assistant turns
    (`replies`), by their character offsets."""
    if not rows:
        return []
    enc = tok([r[0] + r[1] for r in rows], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (prompt, _completion, replies) in zip(enc["input_ids"], enc["offset_mapping"], rows, strict=True):
        learnt = [a >= len(prompt) or any(r["start"] <= a and b <= r["end"] for r in replies) for a, b in offsets]
        out.append((list(ids), [t if keep else -100 for t, keep in zip(ids, learnt, strict=True)]))
    return out


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples (each ends with EOS) and cut into seq_len blocks; the last partial block is kept."""
    ids: list[int] = []
    labels: list[int] = []
    for e_ids, e_labels in examples:
        ids.extend(e_ids)
        labels.extend(e_labels)
    return [(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


@step(
    "train",
    version="4",
    params=TrainParams,
    libs=("torch", "transformers", "peft", "bitsandbytes", "accelerate"),
    reproducible=False,
)
def train(ctx: StepContext) -> None:
    """Fine-tune LoRA adapters; resumable from the checkpoints in the step's scratch dir."""
    import runner.steps.trainer as trainer

    p: TrainParams = ctx.params
    for tracker in p.train.report_to:
        if importlib.util.find_spec(tracker) is None:
            raise StepError(f"train.report_to names {tracker}, which is not installed: pip install {tracker}")
    if p.train.distributed.strategy == "fsdp" and p.train.distributed.world > 1:
        import torch

        if not torch.cuda.is_available():
            raise StepError(
                "strategy fsdp needs GPUs: on CPU, accelerate silently falls back to plain data "
                "parallelism, so runner refuses; use train.distributed.strategy: ddp here"
            )
    if p.train.distributed.strategy == "deepspeed":
        import torch

        if not torch.cuda.is_available():
            raise StepError(
                "strategy deepspeed needs GPUs (DeepSpeed's ZeRO runs on CUDA); use "
                "train.distributed.strategy: ddp here"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise StepError("strategy deepspeed needs the deepspeed package: pip install deepspeed")
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    job = trainer.job_for(ctx, p)
    if p.train.distributed.world > 1:
        trainer.launch_distributed(job, p.train.distributed, ctx.scratch, ctx.log, ctx.progress)
    else:
        trainer.run(job, ctx.progress)
    result = json.loads((ctx.out / "train_result.json").read_text())
    ctx.metrics.update(result["metrics"])
    ctx.metrics.update(json.loads((ctx.scratch / "run.json").read_text()))


@step(
    "merge", version="4", params=MergeParams, libs=("torch", "transformers", "peft", "safetensors"), reproducible=False
)
def merge(ctx: StepContext) -> None:
    """The base model with the trained adapter merged in (fp32 or bf16/fp16 weights), as safetensors, with
    the tokenizer and a chat template that prompts it as it was trained. `package` and `serve` use it."""
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from peft import PeftModel

    from runner.steps.models import load_model, save_tokenizer, use_precision
    from runner.steps.trainer import base_name, base_path

    p: TrainParams = ctx.params.train
    precision = use_precision(p.model.precision, merge=True)
    ctx.metrics["merged_precision"] = precision  # int8/int4 bases are merged dequantized, in fp32
    model = load_model(base_path(ctx, p), precision, trust_remote_code=p.model.trust_remote_code)
    model = PeftModel.from_pretrained(model, ctx.input("train").file("adapter")).merge_and_unload()
    model.config._name_or_path = base_name(p)
    model.save_pretrained(ctx.out / "model", safe_serialization=True)
    save_tokenizer(ctx.input("tokenizer").file("tokenizer"), ctx.out / "model", ctx.params.template)
    shutil.copy(ctx.input("train").file("train_result.json"), ctx.out / "train_result.json")
