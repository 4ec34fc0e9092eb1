"""The eval step: held-out loss and perplexity (of the base model and of the tuned one), and greedy
generations on a fixed prompt set, stored as a table so `runner sql` and `diff` can compare them."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, step
from runner.steps.harness import HarnessConfig
from runner.steps.judge import JudgeConfig
from runner.steps.models import ModelSpec
from runner.steps.prompts import render_prompt

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is 12 plus 30?",
    "How can I sleep better?",
]


class EvalConfig(Params):
    """What the eval step measures."""

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="fixed prompt set")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    harness: HarnessConfig | None = Field(None, description="lm-evaluation-harness tasks (the `eval` extra)")
    judge: JudgeConfig | None = Field(None, description="answers to held-out prompts, judged (the `eval` extra)")


class EvalParams(Params):
    model: ModelSpec
    commit: str | None = None
    template: Literal["human_bot", "plain", "chat"]
    eval: EvalConfig


def held_out_loss(
    model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> tuple[float | None, float | None]:
    """Mean cross-entropy per label token over the validation examples, and its standard error (the delta method
    for a ratio of sums over examples: each example's loss sum and label count)."""
    import torch

    from runner.steps.trainer import collator

    sums: list[float] = []
    counts: list[int] = []
    collate = collator(pad_id)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate([{"input_ids": a, "labels": b} for a, b in rows[i : i + batch_size]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
            )
            sums += loss.sum(dim=1).tolist()
            counts += (shift_labels != -100).sum(dim=1).tolist()
    total, n = sum(counts), len(counts)
    if not total:
        return None, None
    mean = sum(sums) / total
    if n < 2:
        return mean, None
    residual = [s - mean * c for s, c in zip(sums, counts, strict=True)]
    var = sum(r * r for r in residual) / (n - 1)
    return mean, math.sqrt(var / n) / (total / n)


@step("eval", version="4", params=EvalParams, libs=("torch", "transformers", "peft", "duckdb"), reproducible=False)
def evaluate(ctx: StepContext) -> None:
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from runner.serve.codec import end_ids
    from runner.steps.models import load_model, use_precision
    from runner.steps.trainer import base_path

    p: EvalParams = ctx.params
    tok = AutoTokenizer.from_pretrained(ctx.input("tokenizer").file("tokenizer"))
    tok.padding_side = "left"
    tokenized = ctx.input("tokenize")
    val = pq.read_table(tokenized.file(tokenized.manifest["tables"]["validation"]))
    rows = list(zip(val.column("input_ids").to_pylist(), val.column("labels").to_pylist(), strict=False))
    precision = use_precision(p.model.precision)
    ctx.metrics["precision"] = precision
    model = load_model(base_path(ctx, p), precision, trust_remote_code=p.model.trust_remote_code)
    base_loss, base_se = held_out_loss(model, rows, tok.pad_token_id, p.eval.batch_size)
    model = PeftModel.from_pretrained(model, ctx.input("train").file("adapter"))
    loss, se = held_out_loss(model, rows, tok.pad_token_id, p.eval.batch_size)
    ctx.metrics.update(
        {
            "val_loss": loss,
            "val_loss_stderr": se,
            "val_perplexity": math.exp(loss) if loss is not None else None,
            "val_loss_base": base_loss,
            "val_loss_base_stderr": base_se,
            "val_examples": len(rows),
        }
    )
    prompts = [render_prompt(p.template, [{"role": "user", "content": q}], tok) for q in p.eval.prompts]
    outputs = []
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(0, len(prompts), p.eval.batch_size):
            enc = tok(prompts[i : i + p.eval.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=p.eval.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(end_ids(tok, model.generation_config)),
            )
            for row in gen[:, enc["input_ids"].shape[1] :]:
                text = str(tok.decode(row, skip_special_tokens=True))
                outputs.append(text.split("<human>:")[0].strip() if p.template == "human_bot" else text.strip())
    table = pa.table({"prompt": p.eval.prompts, "output": outputs})
    con = duckdb.connect()
    con.register("g", table)
    con.execute(f"copy (select * from g) to '{ctx.out / 'generations.parquet'}' (format parquet)")
    con.close()
    ctx.table("generations", "generations.parquet", len(outputs))
