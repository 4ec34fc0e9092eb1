"""The training loop: a transformers Trainer over PEFT LoRA, checkpointing to the step's scratch dir.

`run(job)` is called in-process, or by every torchrun worker (`python -m runner.steps.trainer JOB`)
for distributed training; each host's first process writes the outputs (so every host of a
multi-node run holds the same artifact), every rank records a hash of its LoRA weights so a test
can check that they agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.registry import StepContext, StepError

if TYPE_CHECKING:
    from runner.steps.evaluation import EvalParams
    from runner.steps.train_config import TrainParams


def base_path(ctx: StepContext, p: TrainParams | EvalParams) -> Path:
    from runner.steps.models import BaseRef, base_dir

    built = ctx.input("model.init").file("model") if isinstance(p.model.base, BaseRef) else None
    spec = p.model.model_copy(update={"revision": p.commit or p.model.revision})
    return base_dir(spec, ctx.files, built)


def base_name(p: TrainParams) -> str:
    """How artifacts name their base model: the hub id or path as the recipe writes it, never a cache path."""
    return p.model.base if isinstance(p.model.base, str) else "runner:model.init"


def job_for(ctx: StepContext, p: TrainParams) -> dict[str, Any]:
    tokenized = ctx.input("tokenize")
    params = p.model_dump(mode="json")
    dist = p.train.distributed  # where this node is is not key material, so the dump leaves it out
    params["train"]["distributed"].update(node_rank=dist.node_rank, rdzv_endpoint=dist.rdzv_endpoint)
    return {
        "params": params,
        "base": str(base_path(ctx, p)),
        "tokenizer": str(ctx.input("tokenizer").file("tokenizer")),
        "train_file": str(tokenized.file(tokenized.manifest["tables"]["train"])),
        "validation_file": str(tokenized.file(tokenized.manifest["tables"]["validation"])),
        "key": ctx.key,
        "out": str(ctx.out),
        "scratch": str(ctx.scratch),
    }


PROGRESS = "RUNNER-PROGRESS "  # a worker's progress line on stdout: this prefix, then JSON


def torchrun_command(job_file: Path, dist: Any, key: str) -> list[str]:
    """torchrun for `train.distributed`: one host (`--standalone`), or this host as node `node_rank` of `nnodes`
    meeting at `rdzv_endpoint` (c10d rendezvous; node 0 hosts it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={dist.nproc}"]
    if dist.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={dist.nnodes}",
            f"--node_rank={dist.node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={dist.rdzv_endpoint}",
            f"--rdzv_id=runner-{key[:16]}",
            f"--rdzv_conf=is_host={'true' if dist.node_rank == 0 else 'false'}",
        ]
    return [*cmd, "-m", "runner.steps.trainer", str(job_file)]


def launch_distributed(job: dict[str, Any], dist: Any, scratch: Path, log: Path, progress: Callable[..., None]) -> None:
    """Run the job under torchrun; workers' progress lines feed `progress`, everything else goes to `log`."""
    job_file = scratch / "job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if dist.nnodes == 1 and sys.platform == "linux":  # every rank is on this host: gloo talks over loopback,
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # whatever the host name resolves to
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        with subprocess.Popen(
            torchrun_command(job_file, dist, job["key"]), env=env, stdout=subprocess.PIPE, stderr=sink, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS):
                    total, done, note = json.loads(line[len(PROGRESS) :])
                    progress(total, done, note)
                else:
                    sink.write(line)
        code = proc.returncode
    if code != 0:
        raise StepError(
            f"distributed training ({dist.nnodes} node(s) x {dist.nproc} processes) failed: "
            f"{worker_error(log.read_text())} (full output in {log})"
        )


def worker_error(output: str) -> str:
    """The lines of torchrun's output that say what went wrong in a worker, not torchrun's summary of it."""
    marks = ("Error", "error:", "terminate called", "what():", "Exception", "Signal", "Killed")
    lines = [x.strip() for x in output.splitlines() if any(m in x for m in marks)]
    return "\n".join(dict.fromkeys(lines[-8:])) or "\n".join(output.strip().splitlines()[-15:])


def _dataset(path: str) -> Any:
    import pyarrow.parquet as pq
    import torch

    table = pq.read_table(path)
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return {"input_ids": ids[i], "labels": labels[i]}

    return Rows()


def collator(pad_id: int) -> Any:
    import torch

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def last_checkpoint(scratch: Path) -> str | None:
    """The newest *complete* checkpoint. The Trainer writes trainer_state.json last, so a checkpoint whose
    state does not parse was cut off by a kill: it is removed, and the one before is used."""
    import shutil

    points = sorted(scratch.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for point in points:
        try:
            json.loads((point / "trainer_state.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(point, ignore_errors=True)
            continue
        return str(point)
    return None


def lora_digest(model: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def run(job: dict[str, Any], progress: Any = None) -> None:
    """Train as the job says; `progress(total, done, note)` hears of every logged step. Under torchrun every
    node's first process writes the outputs (DDP keeps the weights equal on every rank) and prints progress
    lines for the launcher; all processes leave the process group together."""
    if progress is None and os.environ.get("LOCAL_RANK", "0") == "0":

        def progress(total: int, done: int, note: str = "") -> None:
            print(PROGRESS + json.dumps([total, done, note]), flush=True)

    import torch.distributed as dist

    from runner.steps.quiet import hub_offline

    try:
        with hub_offline():  # PEFT's saves ask the hub about the base's vocabulary: the base is local by now
            _run(job, progress)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # nobody leaves while another node still writes its outputs
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(job: dict[str, Any], progress: Any) -> None:
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    import torch
    from transformers import AutoTokenizer, PrinterCallback, Trainer

    from runner.steps.train_config import TrainParams

    p = TrainParams.model_validate(job["params"])
    t = p.train
    out, scratch = Path(job["out"]), Path(job["scratch"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(t.seed)
    tok = AutoTokenizer.from_pretrained(job["tokenizer"])
    model, facts = _lora_model(p, Path(job["base"]))
    dataset = _dataset(job["train_file"])
    if len(dataset) == 0:
        raise StepError("no training examples after tokenisation")
    validation = _dataset(job["validation_file"]) if t.eval_every else None
    if validation is not None and len(validation) == 0:
        raise StepError("train.eval_every needs validation rows; set data.split.validation above 0")
    args = _arguments(p, scratch, world, str(job.get("key", "")))
    timing: dict[str, Any] = {}
    facts["tokens"] = sum(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
    callbacks = _callbacks(t, progress, facts["tokens"], timing, out if rank == 0 else None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=validation,
        data_collator=collator(tok.pad_token_id),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    if args.fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        raise StepError("FSDP was asked for but accelerate did not enable it on this hardware; use strategy: ddp")
    resume = last_checkpoint(scratch)
    trainer.train(resume_from_checkpoint=resume)
    digests = _rank_digests(model, rank, world)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    seconds = timing.get("end", 0) - timing.get("start", 0)
    # facts about this run (how long, how well it used the machine, resumed or not) go to the manifest only,
    # never into the artifact's files: the files are the result, and the result must not change with the clock
    (scratch / "run.json").write_text(
        json.dumps(
            {
                "train_seconds": seconds,
                "eval_seconds": timing.get("evals", []),  # seconds into training, one per validation loss
                "resumed_from": Path(resume).name if resume else None,
                "utilisation": _utilisation(model, dataset, facts["tokens"], trainer.state, timing, seconds, p, world),
            }
        )
    )
    _save(job, p, model, trainer, facts, digests)


def _utilisation(
    model: Any,
    dataset: Any,
    tokens: int,
    state: Any,
    timing: dict[str, Any],
    seconds: float,
    p: TrainParams,
    world: int,
) -> dict[str, Any] | None:
    """MFU of this run on one device (`steps.flops`); None when no training step ran."""
    import torch

    from runner.steps.flops import utilisation

    epochs = (state.epoch or 0.0) - timing.get("first_epoch", 0.0)
    if seconds <= 0 or epochs <= 0:
        return None
    device = next(model.parameters()).device
    example = torch.tensor([dataset[0]["input_ids"][:8]], device=device)
    trained = tokens * epochs / world  # every rank holds the whole dataset; `epoch` counts all ranks' progress
    return utilisation(model, example, round(trained), seconds, p.train.batch_size, tokens / len(dataset))


def _lora_model(p: TrainParams, base: Path) -> tuple[Any, dict[str, Any]]:
    """The base model (quantized as `precision` says) wrapped with fresh LoRA adapters, and facts about it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from runner.steps.models import count_quantized, load_model, lora_targets

    model = load_model(base, p.model.precision, trust_remote_code=p.model.trust_remote_code)
    # PEFT writes the base's name into the adapter and its model card: no cache paths in the bytes
    model.config._name_or_path = base_name(p)
    facts: dict[str, Any] = {}
    if p.model.precision in ("int8", "int4"):
        facts["quantized_layers"] = count_quantized(model)[0]  # before LoRA wraps the layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(
            r=p.lora.rank,
            lora_alpha=p.lora.alpha,
            lora_dropout=p.lora.dropout,
            target_modules=lora_targets(model, p.lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    resolved: Any = model.peft_config["default"]  # a LoraConfig
    # `all-linear` as PEFT resolved it (full module paths): the layer names, as a list of targets gives them
    facts["lora_targets"] = sorted({t.rsplit(".", 1)[-1] for t in resolved.target_modules})
    facts["trainable_params"] = sum(x.numel() for x in model.parameters() if x.requires_grad)
    facts["total_params"] = sum(x.numel() for x in model.parameters())
    return model, facts


def _arguments(p: TrainParams, scratch: Path, world: int, key: str) -> Any:
    """transformers' TrainingArguments for the recipe's `train:` section on this machine."""
    import torch
    from transformers import TrainingArguments

    t = p.train
    nodes = world // int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(scratch),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=t.checkpoint_every,
        save_total_limit=2,
        save_on_each_node=nodes > 1,
        use_cpu=not cuda,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if t.group_by_length and not t.packing else "random",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        log_level="error",
        eval_strategy="steps" if t.eval_every else "no",
        eval_steps=t.eval_every,
        per_device_eval_batch_size=t.batch_size,
        load_best_model_at_end=bool(t.eval_every),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        ddp_backend=("nccl" if cuda else "gloo") if world > 1 else None,
        fsdp="full_shard" if t.distributed.strategy == "fsdp" and world > 1 else "",
        deepspeed=t.distributed.deepspeed_config() if t.distributed.strategy == "deepspeed" else None,
        # tracking through transformers' own integrations (TensorBoard's is added below, writing into the artifact)
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",
        run_name=f"train-{key[:12]}",
    )


def _callbacks(t: Any, progress: Any, tokens: int, timing: dict[str, Any], tensorboard_root: Path | None) -> list[Any]:
    """The clock (progress lines with loss, tokens/s and ETA; `timing` gets start, end and when each evaluation
    ended), early stopping and TensorBoard (written into the artifact, by rank 0: `tensorboard_root`) as the
    recipe asks."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, *a: Any, **k: Any) -> None:
            timing["start"] = time.perf_counter()
            timing["first_step"] = state.global_step  # a resumed run starts past 0
            timing["first_epoch"] = state.epoch or 0.0

        def on_train_end(self, *a: Any, **k: Any) -> None:
            timing["end"] = time.perf_counter()

        def on_evaluate(self, *a: Any, **k: Any) -> None:  # when each validation loss was known
            timing.setdefault("evals", []).append(round(time.perf_counter() - timing["start"], 3))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **k: Any) -> None:
            if progress is None or not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - timing["start"]
            done = state.global_step - timing["first_step"]
            rate = done / elapsed if elapsed > 0 else 0.0
            left = (state.max_steps - state.global_step) / rate if rate else 0.0
            # every rank holds the whole dataset and `epoch` counts what all ranks together have been through
            per_s = tokens * ((state.epoch or 0.0) - timing["first_epoch"]) / elapsed if elapsed > 0 else 0.0
            progress(
                state.max_steps,
                state.global_step,
                f"epoch {state.epoch or 0:.2f}, loss {logs['loss']:.4f}, lr {logs.get('learning_rate', 0):.2e}, "
                f"{per_s:,.0f} tokens/s, ETA {left:.0f} s",
            )

    callbacks: list[Any] = [Clock()]
    if t.early_stopping:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping))
    if "tensorboard" in t.report_to and tensorboard_root is not None:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(tensorboard_root / "tensorboard"))))
    return callbacks


def _rank_digests(model: Any, rank: int, world: int) -> list[dict[str, Any]]:
    """Every rank's adapter hash: every node records all of them, so all nodes hold the same artifact."""
    digests = [{"rank": rank, "lora_sha256": lora_digest(model)}]
    if world > 1:
        import torch.distributed as dist

        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, digests[0])
        digests = everyone
    return digests


def _save(
    job: dict[str, Any], p: TrainParams, model: Any, trainer: Any, facts: dict[str, Any], digests: list[dict[str, Any]]
) -> None:
    """The artifact: the adapter, the rank hashes, train_result.json (losses and metrics) and the loss plot."""
    out = Path(job["out"])
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    for d in digests:
        (out / "ranks" / f"rank{d['rank']}.json").write_text(json.dumps(d))
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    steps = [h["step"] for h in history if "loss" in h]
    trainable, total = facts["trainable_params"], facts["total_params"]
    metrics = {
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        # the mean of the logged losses, not result.training_loss: that one covers only this run's steps, so a
        # resumed run would write a different number (and a different artifact) for the same training
        "train_loss_mean": sum(losses) / len(losses) if losses else None,
        "steps": trainer.state.global_step,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "lora_targets": facts["lora_targets"],
        "precision": p.model.precision,
        "world_size": len(digests),
        "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "epochs_done": trainer.state.epoch,
    }
    if "quantized_layers" in facts:
        metrics["quantized_layers"] = facts["quantized_layers"]
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_name(p)
        cfg.revision = p.commit if isinstance(p.model.base, str) and not p.model.is_local() else None
        cfg.target_modules = sorted(cfg.target_modules)  # a set: its order would change with the hash seed
    model.save_pretrained(out / "adapter", safe_serialization=True)
    (out / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub names local paths
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if val:
        best_step, best = min(val, key=lambda x: (x[1], x[0]))
        metrics.update(
            {
                "val_loss_best": best,
                "val_best_step": best_step,
                "val_loss_last": val[-1][1],
                "early_stopped": trainer.state.global_step < trainer.state.max_steps,
            }
        )
    (out / "train_result.json").write_text(
        json.dumps(
            {
                "metrics": metrics,
                "losses": losses,
                "steps": steps,
                "validation": {"steps": [s for s, _ in val], "losses": [v for _, v in val]},
                "tokens_per_epoch": facts["tokens"],
            },
            sort_keys=True,
        )
    )
    plot(steps, losses, val, out / "loss.png", title=f"train {str(job.get('key', ''))[:12]}")


def plot(steps: list[int], losses: list[float], validation: list[tuple[int, float]], path: Path, title: str) -> None:
    """Training loss (raw and smoothed) and held-out loss against optimiser steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, linewidth=0.8, alpha=0.35, label="training")
    if len(losses) > 1:
        smooth, ema = [], losses[0]
        for x in losses:
            ema = 0.9 * ema + 0.1 * x
            smooth.append(ema)
        ax.plot(steps, smooth, linewidth=1.4, label="training (smoothed)")
    if validation:
        ax.plot([s for s, _ in validation], [v for _, v in validation], "o-", linewidth=1.4, label="validation")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
