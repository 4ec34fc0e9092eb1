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

    python benchmarks/bench_train.py [--repeat 3] [--threads 2] [--epochs 1] [--seq-len 256]   (needs: trl)
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

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
CONFIGS = ["runner", "runner-packing", "trl", "trl-packing", "trainer-grouped"]
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def recipe(work: Path, seq_len: int, epochs: float, packing: bool) -> Path:
    path = work / f"bench-{packing}.yaml"
    path.write_text(f"""
data:
  sources: [{{name: a, format: alpaca, path: {ALPACA}}}]
  split: {{validation: 0.05, seed: 0}}
model:
  base: {{from_config: {{architecture: falcon, hidden_size: 256, layers: 4, heads: 8, seed: 0}}}}
  tokenizer: {{train: {{vocab_size: 2000}}}}
lora: {{rank: 16, alpha: 32, dropout: 0.0, target_modules: {TARGETS}}}
train: {{seq_len: {seq_len}, packing: {str(packing).lower()}, batch_size: 8, lr: 1.0e-3, epochs: {epochs}, seed: 0,
         checkpoint_every: 100000}}
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
    sql = table_sql(split.path, split.manifest, "train", lambda key: build.cache.path(key))
    rows = duckdb.sql(f"select prompt, completion from {sql}").fetchall()
    (work / "rows.json").write_text(json.dumps(rows))
    return {"tokenizer": str(arts["tokenizer"].file("tokenizer")), "model": str(arts["model.init"].file("model"))}


# -- one run each, in a child process ----------------------------------------------------------------------


def child_runner(work: Path, args: argparse.Namespace, packing: bool) -> dict[str, float]:
    from runner import api

    build = api.load(recipe(work, args.seq_len, args.epochs, packing), cache_dir=work / "cache")
    for p in api.plan(build):  # train again: drop the cached train and eval artifacts
        if p.name in ("train", "eval") and p.key and build.cache.get(p.key):
            build.cache.remove(p.key)
    result = api.apply(build)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    train = next(s.artifact for s in result.steps if s.name == "train")
    facts = json.loads(train.file("train_result.json").read_text())
    tokens = facts["tokens_per_epoch"] * args.epochs
    return {
        "seconds": train.manifest["metrics"]["train_seconds"],
        "tokens": tokens,
        "loss": facts["metrics"]["train_loss_last"],
    }


def same(args: argparse.Namespace) -> dict[str, object]:
    """The training arguments every trainer here gets (runner's recipe says the same)."""
    return {
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


def timed(trainer: object, tokens: float) -> dict[str, float]:
    """Seconds in the training loop (as runner's manifest times it), tokens fed, the last logged loss."""
    import time

    start = time.perf_counter()
    result = trainer.train()  # type: ignore[attr-defined]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # type: ignore[attr-defined]
    return {
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
        "loss": losses[-1] if losses else result.training_loss,
    }


def _peft_model(paths: dict[str, str]):  # noqa: ANN202
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
    rows = json.loads((work / "rows.json").read_text())
    ds = Dataset.from_dict({"prompt": [r[0] for r in rows], "completion": [r[1] for r in rows]})
    config = SFTConfig(
        output_dir=str(work / "trl-out"),
        **same(args),
        max_length=args.seq_len,
        packing=packing,
        packing_strategy="wrapped",
        dataloader_num_workers=0,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(model=_peft_model(paths), args=config, train_dataset=ds, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return timed(trainer, sum(len(x) for x in trainer.train_dataset["input_ids"]) * args.epochs)


def child_trainer(work: Path, args: argparse.Namespace, paths: dict[str, str]) -> dict[str, float]:

    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, PrinterCallback, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    rows = json.loads((work / "rows.json").read_text())
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
    return timed(trainer, sum(len(x) for x in ds["input_ids"]) * args.epochs)


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
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "paths.json").write_text(json.dumps(prepare(work, args.seq_len, args.epochs)))
        results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for _ in range(args.repeat):
            for name in names:  # interleaved, so machine noise hits all alike
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    name,
                    "--work",
                    str(work),
                    "--epochs",
                    str(args.epochs),
                    "--seq-len",
                    str(args.seq_len),
                    "--threads",
                    str(args.threads),
                ]
                with open(work / f"log-{name}.txt", "a") as log:
                    subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
                results[name].append(json.loads((work / f"result-{name}.json").read_text()))
                shutil.rmtree(work / "trl-out", ignore_errors=True)
    print(
        f"tiny Falcon LoRA, {args.epochs:g} epoch(s), seq_len {args.seq_len}, batch 8, torch threads "
        f"{args.threads}, {os.cpu_count()} cores; median (min-max) of {args.repeat}"
    )
    rate = {n: [r["tokens"] / r["seconds"] for r in rs] for n, rs in results.items()}
    for name in names:
        r = sorted(rate[name])
        last = statistics.median(x["loss"] for x in results[name])
        print(
            f"  {name:<16} {statistics.median(r):>8,.0f} tokens/s ({r[0]:,.0f}-{r[-1]:,.0f})  "
            f"{results[name][0]['tokens']:>9,.0f} tokens  last logged loss {last:.3f}"
        )
    for ours, theirs in (("runner", "trl"), ("runner-packing", "trl-packing"), ("runner", "trainer-grouped")):
        if ours in rate and theirs in rate:
            print(f"  {ours} / {theirs}: {statistics.median(rate[ours]) / statistics.median(rate[theirs]):.2f}x")


if __name__ == "__main__":
    main()
