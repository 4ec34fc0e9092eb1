"""Data steps that use a model: reward-model quality, embedding similarity, chat templates; plus mix and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner import api
from tests.conftest import sql_rows, write_jsonl

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROWS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "How many legs does a spider have?", "response": "A spider has eight legs."},
    {"prompt": "What is 7 times 6?", "response": "Bananas are yellow and grow in bunches."},
    {"prompt": "Name a primary color.", "response": "Red is a primary color."},
]


def make_tokenizer(path: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def apply_recipe(tmp_path: Path, body: str) -> api.Build:
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "r.yaml").write_text("data:\n  sources: [{name: s, format: jsonl, path: rows.jsonl}]\n" + body)
    b = api.load(tmp_path / "r.yaml")
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    return b


def test_chat_template_format(tmp_path: Path) -> None:
    make_tokenizer(tmp_path / "tok", [r["prompt"] + " " + r["response"] for r in ROWS])
    b = apply_recipe(tmp_path, "  prompt: {template: chat, tokenizer: tok}\n")
    got = dict((r[0], r[1:]) for r in sql_rows(b, "select id, prompt, completion from format"))
    assert got["s/1"] == (
        "<|user|>What is the capital of France?</s><|assistant|>",
        "The capital of France is Paris.</s>",
    )


def test_reward_model_quality_filter(tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok_dir = make_tokenizer(tmp_path / "rm", [r["prompt"] + " " + r["response"] for r in ROWS])
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
        pad_token_id=1,
    )
    BertForSequenceClassification(cfg).save_pretrained(tok_dir)
    # independent scores: the same model called directly
    model = BertForSequenceClassification.from_pretrained(tok_dir).eval()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with torch.no_grad():
        scores = [model(**tok(r["prompt"], r["response"], return_tensors="pt")).logits[0, 0].item() for r in ROWS]
    cut = sorted(scores)[1]  # keeps the top three
    b = apply_recipe(tmp_path, f"  filters: [{{kind: quality, model: rm, min_score: {cut}}}]\n")
    kept = {r[0] for r in sql_rows(b, "select id from filter_quality")}
    assert kept == {f"s/{i + 1}" for i, s in enumerate(scores) if s >= cut}
    assert len(kept) == 3


@pytest.mark.slow
def test_embedding_similarity_drops_unrelated_answers(tmp_path: Path) -> None:
    b = apply_recipe(tmp_path, "  filters: [{kind: similarity, min_similarity: 0.2}]\n")
    dropped = dict(sql_rows(b, "select id, detail from filter_similarity__rejects"))
    assert list(dropped) == ["s/3"] and dropped["s/3"].startswith("prompt/response similarity")


def test_weighted_mix_samples_and_repeats(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "response": f"ra{i}"} for i in range(100)])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "response": f"rb{i}"} for i in range(10)])
    (tmp_path / "r.yaml").write_text(
        "data:\n  sources:\n    - {name: a, format: jsonl, path: a.jsonl, weight: 0.5}\n"
        "    - {name: b, format: jsonl, path: b.jsonl, weight: 2}\n"
    )
    b = api.load(tmp_path / "r.yaml")
    result = api.apply(b)
    mix = next(s for s in result.steps if s.name == "mix").artifact.manifest["rows"]
    ids = [r[0] for r in sql_rows(b, "select id from mix")]
    from_a = [i for i in ids if i.startswith("a/")]
    assert 35 <= len(from_a) <= 65  # a seeded half
    assert [i for i in ids if i.startswith("b/")][:2] == ["b/1", "b/1#2"] and len(ids) - len(from_a) == 20
    assert mix == {"in": 110, "rows": len(ids), "rows_used": len(from_a) + 10, "rejects": 100 - len(from_a)}


def test_export_formats(tmp_path: Path) -> None:
    import datasets

    b = apply_recipe(tmp_path, "  split: {validation: 0.5, seed: 1}\n  export: {formats: [jsonl, parquet, datasets]}\n")
    art = api.artifact(b, "export")
    assert art is not None
    train = [json.loads(line) for line in art.file("train.jsonl").read_text().splitlines()]
    ds = datasets.load_from_disk(str(art.file("datasets")))
    assert len(train) + len(ds["validation"]) == 4 and len(ds["train"]) == len(train)
    assert set(train[0]) == {"id", "source", "group_id", "prompt", "completion", "text"}


def test_explain_cli(tmp_path: Path, cli) -> None:
    apply_recipe(tmp_path, "  filters: [{kind: length, min_chars: 25}]\n")
    code, out, _ = cli("explain", str(tmp_path / "r.yaml"), "s/4", "--json")
    trail = json.loads(out)
    assert trail[-1] == {
        "step": "filter.length",
        "table": "rejects",
        "reason": "too_short",
        "detail": "response has 23 chars, below min_chars 25",
    }
    code, out, _ = cli("explain", str(tmp_path / "r.yaml"), "s/1")
    assert (code == 0 and "kept    in split (train)" in out) or "(validation)" in out


def test_token_length_bounds(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok_dir = make_tokenizer(tmp_path / "tok", [r["prompt"] + " " + r["response"] for r in ROWS])
    b = apply_recipe(tmp_path, "  filters: [{kind: length, field: response, min_tokens: 7, tokenizer: tok}]\n")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    expected = {
        f"s/{i + 1}" for i, r in enumerate(ROWS) if len(tok(r["response"], add_special_tokens=False)["input_ids"]) >= 7
    }
    assert {r[0] for r in sql_rows(b, "select id from filter_length")} == expected
    assert 0 < len(expected) < len(ROWS)


def test_dolly_and_hf_disk_sources(tmp_path: Path) -> None:
    import datasets

    dolly = [
        {
            "instruction": "Summarise the text.",
            "context": "Paris is the capital of France.",
            "response": "Paris is France's capital.",
            "category": "summarization",
        },
        {"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": "brainstorming"},
        {"instruction": "Classify.", "context": "", "category": "classification"},
    ]
    (tmp_path / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dolly))
    datasets.Dataset.from_list([{"q": "hi", "a": "hello"}, {"q": "bye", "a": "goodbye"}]).save_to_disk(
        str(tmp_path / "ds")
    )
    (tmp_path / "r.yaml").write_text(
        "data:\n  sources:\n    - {name: d, format: dolly, path: dolly.jsonl, categories: [summarization, classification]}\n"
        "    - {name: h, format: hf_disk, path: ds, columns: {prompt: q, response: a}}\n"
    )
    b = api.load(tmp_path / "r.yaml")
    result = api.apply(b)
    assert result.ok
    got = dict((r[0], r[1:]) for r in sql_rows(b, "select id, prompt_of(turns), response_of(turns) from mix"))
    assert got == {
        "d/1": ("Summarise the text.\n\nParis is the capital of France.", "Paris is France's capital."),
        "h/1": ("hi", "hello"),
        "h/2": ("bye", "goodbye"),
    }
    reasons = dict(sql_rows(b, "select id, detail from source_d__rejects"))
    assert reasons == {
        "d/2": "record 2: category 'brainstorming' not in ['summarization', 'classification']",
        "d/3": "record 3: missing field 'response'",
    }
