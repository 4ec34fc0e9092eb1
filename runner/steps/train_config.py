"""The training sections of a recipe (`lora:`, `train:`) and the params of the training steps. Kept apart
from the steps (training.py) and their worker (trainer.py), which both read them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from runner.params import Params
from runner.steps.models import FromConfig, ModelSpec, TokenizerRef


class Lora(Params):
    """LoRA adapters (PEFT). With precision int4 this is QLoRA."""

    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto",
        description="`auto`: PEFT's own targets for the model type (Falcon/GPT-NeoX query_key_value; Llama, "
        "Qwen2, Mistral q_proj, v_proj), `all-linear` where PEFT names none (Phi-3); `all-linear`: every linear "
        "layer but the output head; or a list of module names",
    )


class Distributed(Params):
    """torchrun: `nproc` processes on each of `nnodes` hosts (gloo on CPU, nccl on GPU). Every host runs
    `runner apply` on the same recipe with its own `--set train.distributed.node_rank=N`; the hosts meet at
    `rdzv_endpoint` (torchrun's c10d rendezvous, hosted by node 0). Where a node is and which one it is
    do not change the result, so they are not part of the step's key."""

    nproc: int = Field(1, ge=1, description="processes per host")
    nnodes: int = Field(1, ge=1, description="hosts")
    node_rank: int = Field(0, ge=0, exclude=True, description="this host's number, 0 .. nnodes-1 (not in the key)")
    rdzv_endpoint: str | None = Field(
        None,
        exclude=True,
        description="HOST:PORT where the hosts meet, reachable from all of them (nnodes > 1; not in the key)",
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp (CPU or GPU); fsdp and deepspeed (ZeRO, through transformers' integration) need GPUs"
    )
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
        return {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_optimization": zero,
        }

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
    group_by_length: bool = Field(
        True, description="batch examples of similar length (less padding); no effect when packed"
    )
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (overrides epochs)")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="optimiser steps between checkpoints (resume after a kill)")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="optimiser steps between held-out loss evaluations during "
        "training; the adapter kept is the best by that loss",
    )
    early_stopping: int | None = Field(
        None, ge=1, description="stop after this many evaluations without a better held-out loss (needs eval_every)"
    )
    merge: bool = Field(False, description="also write the base model with the adapter merged in")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="experiment tracking through transformers' integrations (off by default); "
        "TensorBoard's event files go into the artifact's `tensorboard/`",
    )
    distributed: Distributed = Distributed()

    @model_validator(mode="after")
    def _eval_fits(self) -> TrainConfig:
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("early_stopping needs eval_every")
        if self.eval_every is not None and self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of eval_every "
                f"({self.eval_every}) so the best checkpoint can be kept"
            )
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


class MergeParams(Params):
    train: TrainParams
    template: Literal["human_bot", "plain", "chat"] = Field(description="the prompt format, for the chat template")
