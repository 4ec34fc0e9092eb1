"""Training steps: tokenizer, model.init (from_config), tokenize, train (LoRA/QLoRA), merge.

Tokenizing is its own step, so changing a training param never re-tokenises. The heavy
loop lives in `trainer.py` (also run by torchrun workers for `distributed.nproc > 1`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from typing import Literal

from pydantic import Field, model_validator

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.models import FromConfig, ModelSpec, TokenizerRef


class Lora(Params):
    """LoRA adapters (PEFT). With precision int4 this is QLoRA."""

    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["auto"] = Field(
        "auto", description="`auto`: Falcon/GPT-NeoX query_key_value, dense, dense_h_to_4h, dense_4h_to_h; "
                            "Llama q/k/v/o/gate/up/down_proj")


class Distributed(Params):
    """torchrun: `nproc` processes on each of `nnodes` hosts (gloo on CPU, nccl on GPU). Every host runs
    `runner apply` on the same recipe with its own `--set train.distributed.node_rank=N`; the hosts meet at
    `rdzv_endpoint` (torchrun's c10d rendezvous, hosted by node 0). Where a node is and which one it is
    do not change the result, so they are not part of the step's key."""

    nproc: int = Field(1, ge=1, description="processes per host")
    nnodes: int = Field(1, ge=1, description="hosts")
    node_rank: int = Field(0, ge=0, exclude=True, description="this host's number, 0 .. nnodes-1 (not in the key)")
    rdzv_endpoint: str | None = Field(None, exclude=True, description="HOST:PORT where the hosts meet, reachable "
                                                                      "from all of them (nnodes > 1; not in the key)")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp (CPU or GPU); fsdp and deepspeed (ZeRO, through transformers' integration) need GPUs")
    zero_stage: Literal[1, 2, 3] = Field(2, description="deepspeed: ZeRO stage")
    offload: bool = Field(False, description="deepspeed: optimizer state (stage 3: parameters too) offloaded to CPU")

    def deepspeed_config(self) -> dict[str, object]:
        """The DeepSpeed config transformers is given for `strategy: deepspeed` ("auto" values are filled by
        transformers from the training arguments, as its integration documents)."""
        zero: dict[str, object] = {"stage": self.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
        if self.offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if self.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                "zero_optimization": zero}

    @model_validator(mode="after")
    def _nodes(self) -> Distributed:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint: HOST:PORT of node 0, reachable from every node")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not below nnodes {self.nnodes}")
        return self

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


class TrainConfig(Params):
    """The optimisation. `seq_len` and `packing` belong to tokenisation (a separate cached step)."""

    seq_len: int = Field(256, ge=8)
    packing: bool = Field(False, description="concatenate examples into full seq_len blocks (no padding)")
    batch_size: int = Field(8, ge=1)
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding); no effect when packed")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (overrides epochs)")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="optimiser steps between checkpoints (resume after a kill)")
    eval_every: int | None = Field(None, ge=1, description="optimiser steps between held-out loss evaluations during "
                                                           "training; the adapter kept is the best by that loss")
    early_stopping: int | None = Field(None, ge=1, description="stop after this many evaluations without a better "
                                                               "held-out loss (needs eval_every)")
    merge: bool = Field(False, description="also write the base model with the adapter merged in")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="experiment tracking through transformers' integrations (off by default); "
                                          "TensorBoard's event files go into the artifact's `tensorboard/`")
    distributed: Distributed = Distributed()

    @model_validator(mode="after")
    def _eval_fits(self) -> TrainConfig:
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("early_stopping needs eval_every")
        if self.eval_every is not None and self.checkpoint_every % self.eval_every:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of eval_every "
                             f"({self.eval_every}) so the best checkpoint can be kept")
        return self


class TokenizerParams(Params):
    tokenizer: TokenizerRef | None
    base: str | None = None
    commit: str | None = None


class InitParams(Params):
    from_config: FromConfig


class TokenizeParams(Params):
    seq_len: int
    packing: bool


class TrainParams(Params):
    model: ModelSpec
    commit: str | None = Field(None, description="resolved hub commit of the base (key material)")
    lora: Lora
    train: TrainConfig


@step("tokenizer", version="1", params=TokenizerParams, libs=("tokenizers", "transformers"))
def make_tokenizer(ctx: StepContext) -> None:
    """Train a byte-level BPE on the training text, or copy the given / the base model's tokenizer."""
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p: TokenizerParams = ctx.params
    out = ctx.out / "tokenizer"
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
        trainer = trainers.BpeTrainer(vocab_size=p.tokenizer.train.vocab_size, min_frequency=p.tokenizer.train.min_frequency,
                                      special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       pad_token="<|pad|>")
    else:
        from runner.steps.models import base_dir

        source = ctx.files[p.tokenizer.path] if p.tokenizer is not None and p.tokenizer.path else \
            base_dir(ModelSpec(base=p.base or "", revision=p.commit or "main"), ctx.files, None)
        try:
            fast = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise StepError(f"no tokenizer could be loaded from {source} ({exc})") from None
        if fast.pad_token is None:
            fast.pad_token = fast.eos_token
    fast.save_pretrained(out)
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


@step("tokenize", version="1", params=TokenizeParams, libs=("duckdb", "tokenizers", "transformers"))
def tokenize(ctx: StepContext) -> None:
    """Token ids and labels (prompt tokens masked with -100) for train and validation; packed if asked."""
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
            rows = con.execute(f"select prompt, completion from {open_input(ctx, 'split', table=split)}").fetchall()
            prompts = tok([r[0] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
            replies = tok([r[1] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
            examples = []
            for prompt_ids, reply_ids in zip(prompts, replies):
                ids = prompt_ids + reply_ids + [tok.eos_token_id]
                labels = [-100] * len(prompt_ids) + reply_ids + [tok.eos_token_id]
                examples.append((ids[: p.seq_len], labels[: p.seq_len]))
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


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples (each ends with EOS) and cut into seq_len blocks; the last partial block is kept."""
    ids: list[int] = []
    labels: list[int] = []
    for e_ids, e_labels in examples:
        ids.extend(e_ids)
        labels.extend(e_labels)
    return [(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


@step("train", version="3", params=TrainParams, libs=("torch", "transformers", "peft", "bitsandbytes", "accelerate"),
      reproducible=False)
def train(ctx: StepContext) -> None:
    """Fine-tune LoRA adapters; resumable from the checkpoints in the step's scratch dir."""
    from runner.steps import trainer

    p: TrainParams = ctx.params
    for tracker in p.train.report_to:
        if importlib.util.find_spec(tracker) is None:
            raise StepError(f"train.report_to names {tracker}, which is not installed: pip install {tracker}")
    if p.train.distributed.strategy == "fsdp" and p.train.distributed.world > 1:
        import torch

        if not torch.cuda.is_available():
            raise StepError("strategy fsdp needs GPUs: on CPU, accelerate silently falls back to plain data "
                            "parallelism, so runner refuses; use train.distributed.strategy: ddp here")
    if p.train.distributed.strategy == "deepspeed":
        import torch

        if not torch.cuda.is_available():
            raise StepError("strategy deepspeed needs GPUs (DeepSpeed's ZeRO runs on CUDA); use "
                            "train.distributed.strategy: ddp here")
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


class MergeParams(Params):
    train: TrainParams
    template: Literal["human_bot", "plain", "chat"] = Field(description="the prompt format, for the chat template")


@step("merge", version="3", params=MergeParams, libs=("torch", "transformers", "peft", "safetensors"), reproducible=False)
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
