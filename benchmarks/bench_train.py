"""LoRA SFT throughput: runner's train step against TRL's `SFTTrainer` and a transformers `Trainer` with
`group_by_length=True`, same tiny model, same rows, same LoRA, batch, learning rate and epochs, in one run.

Every configuration runs --repeat times, each in its own process with torch pinned to --threads threads
(OMP/MKL too) and no dataloader workers, so runs differ only by noise; the table shows the median and the
spread. Effective tokens/s = the tokens each trainer fed (not padding) per epoch x epochs / seconds in its
training loop (model loading excluded everywhere). Loss is on the reply only in runner and TRL (its
prompt-completion mode), on the whole text in the plain Trainer (its collator has no prompt mask).

- runner, packing off / on: `train.group_by_length` (on by default) and `train.packing`;
- TRL SFTTrainer, packing off / on (`packing_strategy: wrapped`, runner's own way of packing);
- Trainer + PEFT, `group_by_length=True`, padded per batch.

The model is a Falcon built from its config (hidden 256, 4 layers) with a BPE tokenizer trained on the data;
the rows are the Alpaca sample in ../shared/data (formatted by runner's format step, h2oGPT prompts).

Time to the same validation loss: runner and TRL (packing off and on) run again with a validation loss every
--eval-every steps on the same held-out rows (the reply's tokens only in both); the table gives the seconds
into training at which each first reached the highest of the runs' best losses (a loss every run reaches).

    python benchmarks/bench_train.py [--repeat 3] [--threads 2] [--epochs 1] [--seq-len 256] [--eval-every 10]
    (needs: trl)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
CONFIGS = ["runner", "runner-packing", "trl", "trl-packing", "trainer-grouped"]
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def recipe(work: Path, seq_len: int, epochs: float, packing: bool, eval_every: int = 0) -> Path:
    path = work / f"bench-{packing}-{eval_every}.yaml"
    evals = f", eval_every: {eval_every}" if eval_every else ""
    path.write_text(f"""
data:
  sources: [{{name: a, format: alpaca, path: {ALPACA}}}]
  split: {{validation: 0.05, seed: 0}}
model:
  base: {{from_config: {{architecture: falcon, hidden_size: 256, layers: 4, heads: 8, seed: 0}}}}
  tokenizer: {{train: {{vocab_size: 2000}}}}
lora: {{rank: 16, alpha: 32, dropout: 0.0, target_modules: {TARGETS}}}
train: {{seq_len: {seq_len}, packing: {str(packing).lower()}, batch_size: 8, lr: 1.0e-3, epochs: {epochs}, seed: 0,
         checkpoint_every: 100000{evals}}}
""")
    return path


def prepare(work: Path, seq_len: int, epochs: float) -> dict[str, str]:
    """Build everything the trainers share (rows, tokenizer, model) once; return their paths."""
    import duckdb

    from runner import api
    from stores.datastore import table_sql

    build = api.load(recipe(work, seq_len, epochs, False), cache_dir=work / "cache", targets=["tokenize", "model.init"])
    result = api.apply(build)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    arts = {s.name: s.artifact for s in result.steps}
    split = arts["split"]
    for table in ("train", "validation"):
        sql = table_sql(split.path, split.manifest, table, lambda key: build.cache.path(key))
        rows = duckdb.sql(f"select prompt, completion from {sql}").fetchall()
        (work / f"{table}.json").write_text(json.dumps(rows))
    return {"tokenizer": str(arts["tokenizer"].file("tokenizer")), "model": str(arts["model.init"].file("model"))}


# -- one run each, in a child process ----------------------------------------------------------------------


def child_runner(work: Path, args: argparse.Namespace, packing: bool) -> dict[str, float]:
    from runner import api

    build = api.load(recipe(work, args.seq_len, args.epochs, packing, args.eval_every), cache_dir=work / "cache")
    for p in api.plan(build):  # train again: drop the cached train and eval artifacts
        if p.name in ("train", "eval") and p.key and build.cache.get(p.key):
            build.cache.remove(p.key)
    result = api.apply(build)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    train = next(s.artifact for s in result.steps if s.name == "train")
    facts = json.loads(train.file("train_result.json").read_text())
    tokens = facts["tokens_per_epoch"] * args.epochs
    val = facts["validation"]
    return {
        "seconds": train.manifest["metrics"]["train_seconds"],
        "tokens": tokens,
        "flops_per_token": train.manifest["metrics"]["utilisation"]["flops_per_token"]["total"],
        "loss": facts["metrics"]["train_loss_last"],
        "evals": list(zip(val["steps"], train.manifest["metrics"]["eval_seconds"], val["losses"], strict=False)),
    }


def same(args: argparse.Namespace) -> dict[str, object]:
    """The training arguments every trainer here gets (runner's recipe says the same)."""
    evals = {"eval_strategy": "steps", "eval_steps": args.eval_every, "per_device_eval_batch_size": 8}
    return {
        **(evals if args.eval_every else {}),
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "num_train_epochs": args.epochs,
        "seed": 0,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 50,
        "disable_tqdm": True,
        "lr_scheduler_type": "cosine",
    }


def timed(trainer: object, tokens: float, rows: int) -> dict[str, object]:
    """Seconds in the training loop (as runner's manifest times it), tokens fed, the FLOPs per token (counted as
    runner's manifest counts them, at the mean length of the `rows` fed), the last logged loss, and each
    validation loss with its step and the seconds into training it was known at (runner's manifest records
    the same)."""
    import time

    import torch
    from transformers import TrainerCallback

    from runner.steps.flops import linear_layers, per_token

    evals: list[tuple[int, float, float]] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            evals.append((state.global_step, time.perf_counter() - start, metrics["eval_loss"]))

    trainer.add_callback(Clock)  # type: ignore[attr-defined]
    start = time.perf_counter()
    result = trainer.train()  # type: ignore[attr-defined]
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # type: ignore[attr-defined]
    model = trainer.model  # type: ignore[attr-defined]
    layers = linear_layers(model, torch.ones((1, 8), dtype=torch.long))
    return {
        "seconds": seconds,
        "tokens": tokens,
        "flops_per_token": per_token(layers, model.config, tokens / rows)["total"],
        "loss": losses[-1] if losses else result.training_loss,
        "evals": evals,
    }


def _peft_model(paths: dict[str, str]):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS)
    return get_peft_model(model, config)


def child_trl(work: Path, args: argparse.Namespace, packing: bool, paths: dict[str, str]) -> dict[str, float]:

    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    ds, val = (
        Dataset.from_dict({"prompt": [r[0] for r in rows], "completion": [r[1] for r in rows]})
        for rows in (json.loads((work / f"{t}.json").read_text()) for t in ("train", "validation"))
    )
    config = SFTConfig(
        output_dir=str(work / "trl-out"),
        **same(args),
        max_length=args.seq_len,
        packing=packing,
        packing_strategy="wrapped",
        dataloader_num_workers=0,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=_peft_model(paths),
        args=config,
        train_dataset=ds,
        eval_dataset=val if args.eval_every else None,
        processing_class=tok,
    )
    trainer.remove_callback(PrinterCallback)
    fed = trainer.train_dataset["input_ids"]
    return timed(trainer, sum(len(x) for x in fed) * args.epochs, len(fed) * args.epochs)


def child_trainer(work: Path, args: argparse.Namespace, paths: dict[str, str]) -> dict[str, float]:

    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, PrinterCallback, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    rows = json.loads((work / "train.json").read_text())
    texts = [p + c + tok.eos_token for p, c in rows]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=args.seq_len), batched=True, remove_columns=["text"]
    )
    targs = TrainingArguments(
        output_dir=str(work / "plain-out"),
        **same(args),
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=_peft_model(paths),
        args=targs,
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.remove_callback(PrinterCallback)
    return timed(trainer, sum(len(x) for x in ds["input_ids"]) * args.epochs, len(ds) * args.epochs)


def child(name: str, work: Path, args: argparse.Namespace) -> None:
    import torch

    from runner.steps.quiet import quiet_ml

    quiet_ml()
    torch.set_num_threads(args.threads)
    paths = json.loads((work / "paths.json").read_text())
    if name.startswith("runner"):
        out = child_runner(work, args, name.endswith("packing"))
    elif name.startswith("trl"):
        out = child_trl(work, args, name.endswith("packing"), paths)
    else:
        out = child_trainer(work, args, paths)
    (work / f"result-{name}.json").write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument(
        "--eval-every", type=int, default=10, help="steps between validation losses in the time-to-loss runs (0: none)"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, Path(args.work), args)
    names = args.only.split(",")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "PYTHONPATH": str(ROOT),
        "TOKENIZERS_PARALLELISM": "false",
    }

    def run(work: Path, name: str, eval_every: int) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--eval-every", str(eval_every)]
        cmd += ["--epochs", str(args.epochs), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        with open(work / f"log-{name}.txt", "a") as log:
            done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n" + (work / f"log-{name}.txt").read_text()[-3000:])
        shutil.rmtree(work / "trl-out", ignore_errors=True)
        return json.loads((work / f"result-{name}.json").read_text())

    # the loss runs: trainers whose validation loss counts the reply only (the plain Trainer's counts the prompt)
    to_loss = [n for n in names if not n.startswith("trainer")] if args.eval_every else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "paths.json").write_text(json.dumps(prepare(work, args.seq_len, args.epochs)))
        results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        curves: dict[str, list[dict[str, Any]]] = {n: [] for n in to_loss}
        for _ in range(args.repeat):
            for name in names:  # interleaved, so machine noise hits all alike
                results[name].append(run(work, name, 0))
            for name in to_loss:  # evaluation takes time: these runs are not in the tokens/s table
                curves[name].append(run(work, name, args.eval_every))
    print(
        f"tiny Falcon LoRA, {args.epochs:g} epoch(s), seq_len {args.seq_len}, batch 8, torch threads "
        f"{args.threads}, {os.cpu_count()} cores; median (min-max) of {args.repeat}"
    )
    rate = {n: [r["tokens"] / r["seconds"] for r in rs] for n, rs in results.items()}
    peak = _peak(args.threads)
    print(
        f"  matmul peak, fp32, (8 x 128) x 256 @ 256 x 1024 (the MLP's shape), {args.threads} threads: {peak / 1e9:.1f} GFLOP/s"
    )
    for name in names:
        r = sorted(rate[name])
        last = statistics.median(x["loss"] for x in results[name])
        mfu = sorted(x["flops_per_token"] * x["tokens"] / x["seconds"] / peak for x in results[name])
        print(
            f"  {name:<16} {statistics.median(r):>8,.0f} tokens/s ({r[0]:,.0f}-{r[-1]:,.0f})  "
            f"MFU {statistics.median(mfu):.1%} ({mfu[0]:.1%}-{mfu[-1]:.1%})  "
            f"{results[name][0]['tokens']:>9,.0f} tokens  last logged loss {last:.3f}"
        )
    for ours, theirs in (("runner", "trl"), ("runner-packing", "trl-packing"), ("runner", "trainer-grouped")):
        if ours in rate and theirs in rate:
            print(f"  {ours} / {theirs}: {statistics.median(rate[ours]) / statistics.median(rate[theirs]):.2f}x")
    if curves:
        time_to_loss(curves, args.eval_every)


def _peak(threads: int) -> float:
    """This machine's fp32 matmul FLOP/s at the MLP's shape, as runner's train step measures it."""
    import torch

    from runner.steps.flops import matmul_peak

    torch.set_num_threads(threads)
    return max(matmul_peak(8 * 128, 256, 1024, torch.float32, "cpu", seconds=1.0) for _ in range(3))


def time_to_loss(curves: dict[str, list[dict[str, Any]]], every: int) -> None:
    """Seconds into training at which each trainer's validation loss first reached the loss every run reaches
    (the highest of the runs' best), from the runs with a validation loss every `every` steps."""
    target = max(min(loss for _, _, loss in r["evals"]) for runs in curves.values() for r in runs)
    print(f"time to validation loss {target:.3f} (the best loss every run reaches), evaluated every {every} steps:")
    reached: dict[str, float] = {}
    for name, runs in curves.items():
        seconds = sorted(next(t for _, t, loss in r["evals"] if loss <= target) for r in runs)
        steps = [next(s for s, _, loss in r["evals"] if loss <= target) for r in runs]
        first = statistics.median(r["evals"][0][2] for r in runs)
        best = statistics.median(min(loss for _, _, loss in r["evals"]) for r in runs)
        reached[name] = statistics.median(seconds)
        print(
            f"  {name:<16} {reached[name]:>7.1f} s ({seconds[0]:.1f}-{seconds[-1]:.1f}) at step "
            f"{statistics.median(steps):.0f}; first validation loss {first:.3f}, best {best:.3f}"
        )
    for ours, theirs in (("runner", "trl"), ("runner-packing", "trl-packing")):
        if ours in reached and theirs in reached:
            print(f"  {theirs} time / {ours} time: {reached[theirs] / reached[ours]:.2f}x")


if __name__ == "__main__":
    main()
