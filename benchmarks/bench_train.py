"""Training throughput: runner's train step vs a plain transformers Trainer + PEFT script, same tiny model,
same data, same LoRA and batch settings, in one run. Prints effective (non-pad) tokens per second and
the ratios; targets: >= 1.0x without packing, >= 1.5x with packing.

The model is a Falcon built from its config (hidden 256, 4 layers) with a BPE tokenizer trained on the
data; the data is the Alpaca sample in ../shared/data when present, else the bundled sample.

    python benchmarks/bench_train.py [--epochs 1] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"


def recipe(work: Path, seq_len: int, epochs: float, packing: bool) -> Path:
    source = (
        f"{{name: a, format: alpaca, path: {ALPACA}}}"
        if ALPACA.exists()
        else f"{{name: s, format: oasst, path: {ROOT / 'recipes/data/sample.oasst.jsonl'}, lang: [en]}}"
    )
    path = work / f"bench-{packing}.yaml"
    path.write_text(f"""
data:
  sources: [{source}]
  split: {{validation: 0.05, seed: 0}}
model:
  base: {{from_config: {{architecture: falcon, hidden_size: 256, layers: 4, heads: 8, seed: 0}}}}
  tokenizer: {{train: {{vocab_size: 2000}}}}
lora: {{rank: 16, alpha: 32, dropout: 0.0}}
train: {{seq_len: {seq_len}, packing: {str(packing).lower()}, batch_size: 8, lr: 1.0e-3, epochs: {epochs}, seed: 0,
         checkpoint_every: 100000}}
""")
    return path


def run_runner(work: Path, seq_len: int, epochs: float, packing: bool) -> tuple[float, int, dict]:
    from runner import api

    build = api.load(recipe(work, seq_len, epochs, packing), cache_dir=work / "cache")
    result = api.apply(build)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    arts = {s.name: s.artifact for s in result.steps}
    import json

    train = json.loads(arts["train"].file("train_result.json").read_text())
    tokens = int(train["tokens_per_epoch"] * epochs)
    return arts["train"].manifest["metrics"]["train_seconds"], tokens, arts


def run_plain(arts: dict, seq_len: int, epochs: float) -> tuple[float, int]:
    """What a user writes by hand: tokenize prompt+completion, pad per batch, Trainer + PEFT."""
    import duckdb
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from stores.datastore import table_sql

    tok = AutoTokenizer.from_pretrained(arts["tokenizer"].file("tokenizer"))
    split = arts["split"]
    sql = table_sql(split.path, split.manifest, "train", lambda key: split.path.parent.parent / key[:2] / key)
    texts = [r[0] + tok.eos_token for r in duckdb.sql(f"select text from {sql}").fetchall()]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=seq_len), batched=True, remove_columns=["text"]
    )
    tokens = int(sum(len(x) for x in ds["input_ids"]) * epochs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(arts["model.init"].file("model"))
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        ),
    )
    args = TrainingArguments(
        output_dir=str(split.path.parent / "plain-out"),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        num_train_epochs=epochs,
        seed=0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=50,
        disable_tqdm=True,
        lr_scheduler_type="cosine",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False)
    )
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        r_s, r_tok, arts = run_runner(work, args.seq_len, args.epochs, packing=False)
        p_s, p_tok = run_plain(arts, args.seq_len, args.epochs)
        k_s, k_tok, _ = run_runner(work, args.seq_len, args.epochs, packing=True)
    plain, ours, packed = p_tok / p_s, r_tok / r_s, k_tok / k_s
    print(f"plain Trainer + PEFT:    {p_tok:>8,} tokens in {p_s:6.2f} s = {plain:8.0f} effective tokens/s")
    print(f"runner, no packing:      {r_tok:>8,} tokens in {r_s:6.2f} s = {ours:8.0f} effective tokens/s")
    print(f"runner, packing:         {k_tok:>8,} tokens in {k_s:6.2f} s = {packed:8.0f} effective tokens/s")
    print(f"ratio runner / plain, no packing: {ours / plain:.2f}x (target >= 1.0x)")
    print(f"ratio runner / plain, packing:    {packed / plain:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
