"""`answers`: the base and the tuned model answer the same held-out prompts (greedy), the table judges score.

The prompts are the validation split's (rendered as the model was trained, with the held-out reply as the
reference) or a JSONL file of `{prompt, reference?}` user turns. `answers.base` does not read the training, so a
new adapter never re-answers with the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.models import ModelSpec


class AnswersConfig(Params):
    """Which held-out prompts the models answer, and how long their answers may be."""

    prompts: str = Field(
        "validation",
        description="`validation`: the validation split's prompts, their held-out replies the references; or a "
        "JSONL file of {prompt, reference?} user turns",
    )
    limit: int | None = Field(100, ge=1, description="the first N prompts (None: all)")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)

    def external_paths(self) -> dict[str, str]:
        return {} if self.prompts == "validation" else {"prompts": self.prompts}


class AnswersParams(Params):
    model: ModelSpec
    commit: str | None = None
    template: Literal["human_bot", "plain", "chat"]
    tuned: bool
    answers: AnswersConfig


def greedy(
    model: Any, tok: Any, prompts: list[str], template: str, max_new_tokens: int, batch_size: int, ctx: StepContext
) -> list[str]:
    """Each prompt's greedy answer (left-padded batches), cut before the template's stop strings."""
    import torch

    from runner.serve.codec import Codec, end_ids
    from runner.serve.text import cut_at_stop

    stops = Codec(template, tok).stops
    ends = sorted(end_ids(tok, model.generation_config))
    tok.padding_side = "left"
    out: list[str] = []
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=ends,
            )
            for row in gen[:, enc["input_ids"].shape[1] :]:
                out.append(cut_at_stop(str(tok.decode(row, skip_special_tokens=True)), stops)[0].strip())
            ctx.progress(len(prompts), len(out), "answers")
    return out


def held_out(ctx: StepContext, p: AnswersParams, tok: Any) -> list[dict[str, Any]]:
    """The prompts to answer: {id, prompt (as the model sees it), reference (or None)}."""
    from runner.serve.codec import Codec
    from runner.serve.text import cut_at_stop
    from runner.steps.prompts import render_prompt

    a = p.answers
    if a.prompts == "validation":
        import duckdb

        from runner.steps.tables import open_input

        con = duckdb.connect()
        try:
            split = open_input(ctx, "split", table="validation")
            found = con.execute(f"select id, prompt, completion from {split} order by id").fetchall()
        finally:
            con.close()
        stops = [*Codec(p.template, tok).stops, *([tok.eos_token] if tok.eos_token else [])]
        rows = [
            {"id": i, "prompt": prompt, "reference": cut_at_stop(completion, stops)[0].strip()}
            for i, prompt, completion in found
        ]
    else:
        rows = []
        path = ctx.files[a.prompts]
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise StepError(f"{a.prompts} line {n}: expected a JSON object with a `prompt` string") from None
            prompt = render_prompt(p.template, [{"role": "user", "content": str(text)}], tok)
            rows.append({"id": str(record.get("id", n)), "prompt": prompt, "reference": record.get("reference")})
    if not rows:
        raise StepError(f"no prompts to answer in {a.prompts}")
    return rows[: a.limit]


@step("answers", version="2", params=AnswersParams, libs=("torch", "transformers", "peft"), reproducible=False)
def answer(ctx: StepContext) -> None:
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from runner.steps.models import load_model, use_precision
    from runner.steps.trainer import base_path

    p: AnswersParams = ctx.params
    tok = AutoTokenizer.from_pretrained(ctx.input("tokenizer").file("tokenizer"))
    rows = held_out(ctx, p, tok)
    model = load_model(base_path(ctx, p), use_precision(p.model.precision), trust_remote_code=p.model.trust_remote_code)  # type: ignore[arg-type]
    if p.tuned:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ctx.input("train").file("adapter"))
    model.eval()
    texts = greedy(
        model, tok, [r["prompt"] for r in rows], p.template, p.answers.max_new_tokens, p.answers.batch_size, ctx
    )
    table = pa.Table.from_pylist([r | {"answer": t} for r, t in zip(rows, texts, strict=True)])
    pq.write_table(table, ctx.table("answers", "answers.parquet", len(rows)))
    ctx.metrics.update({"model": "tuned" if p.tuned else "base", "n": len(rows)})
