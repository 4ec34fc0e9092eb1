"""eval.judge: the base and tuned models' answers to held-out prompts, judged against references (sacrebleu,
rouge-score), by a reward model and by an LLM behind an OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import math
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from runner import api
from tests.conftest import SHARED_DATA, apply_json, needs_shared_data, step_states, tiny_model_recipe, write_jsonl
from tests.test_data_steps_ml import make_tokenizer


@needs_shared_data
def test_reference_scores_are_sacrebleus_and_rouge_scores_on_real_replies() -> None:
    """Alpaca's replies as references, and as answers the same replies cut to their first half: runner's numbers
    are sacrebleu's and rouge-score's, called here directly."""
    import sacrebleu
    from rouge_score import rouge_scorer

    from runner.steps.judge import reference_scores

    records = json.loads((SHARED_DATA / "instruct" / "alpaca_en_demo.json").read_text())[:60]
    rows = []
    for i, r in enumerate(records):
        words = r["output"].split()
        rows.append({"id": str(i), "reference": r["output"], "answer": " ".join(words[: max(1, len(words) // 2)])})
    out, metrics = reference_scores(rows)
    hyps, refs = [r["answer"] for r in rows], [r["reference"] for r in rows]
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hyps, refs, strict=True)]
    assert [r["rouge_l"] for r in out] == pytest.approx(rouge, abs=1e-12)
    assert metrics["rouge_l"] == pytest.approx(statistics.fmean(rouge), abs=1e-12)
    assert metrics["rouge_l_stderr"] == pytest.approx(statistics.stdev(rouge) / math.sqrt(len(rouge)), abs=1e-12)
    sentence = [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs, strict=True)]
    assert [r["sentence_bleu"] for r in out] == pytest.approx(sentence, abs=1e-9) and metrics["n"] == 60
    # corpus BLEU's stderr by bootstrap over the prompts: a resampling of our own (other draws) agrees
    import numpy as np

    rng = np.random.default_rng(7)
    draws = [rng.integers(0, len(hyps), len(hyps)) for _ in range(200)]
    boot = [sacrebleu.corpus_bleu([hyps[i] for i in d], [[refs[i] for i in d]]).score for d in draws]
    assert metrics["bleu_stderr"] == pytest.approx(float(np.std(boot, ddof=1)), rel=0.25)


class Judge(ThreadingHTTPServer):
    """A stand-in for a judge model behind an OpenAI-compatible API: it rates an answer 1 + (its length mod 10),
    and says something without a rating when the answer is empty. It counts the requests it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                server.requests.append(content)
                _, found, rest = content.partition("[The Start of Assistant's Answer]\n")
                answer = rest.split("\n[The End", 1)[0] if found else ""
                reply = f"Fine. Rating: [[{1 + len(answer) % 10}]]" if answer else "I cannot rate an empty answer."
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.mark.slow
def test_answers_judged_by_an_llm_and_a_reward_model(tmp_path: Path, cli: Any) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": q, "reference": a} for q, a in (("What is 2 + 2?", "4"), ("Name a color.", "Blue."), ("Hi", ""))]
        + [{"prompt": f"Say {w}.", "reference": w} for w in ("yes", "no", "maybe")],
    )
    rm = make_tokenizer(tmp_path / "rm", ["What is 2 + 2 ? Name a color . Hi Say yes no maybe"])
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=1, pad_token_id=1)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(rm)
    judge = Judge()
    recipe = tmp_path / "r.yaml"

    def write(url: str) -> None:
        recipe.write_text(
            tiny_model_recipe(
                rest="train: {seq_len: 64, epochs: 1}\neval:\n  max_new_tokens: 4\n  judge:\n"
                f"    prompts: {prompts}\n    max_new_tokens: 6\n    reward: {rm}\n"
                f"    llm: {{url: '{url}', model: judge-7b}}\n"
            )
        )

    try:
        write(judge.url)
        apply_json(cli, str(recipe))
        build = api.load(recipe)
        for step, answered in (("judge.llm", "answers"), ("judge.base.llm", "answers.base")):
            answers = {r["id"]: r for r in api.table(build, answered, "answers").to_pylist()}
            rows = api.table(build, step, "judgements").to_pylist()
            assert len(rows) == 6
            for r in rows:
                answer = answers[r["id"]]["answer"]
                want = 1 + len(answer) % 10 if answer else None
                assert r["rating"] == want and (r["failure"] is None) == (want is not None)
            rated = [r["rating"] for r in rows if r["rating"] is not None]
            m = api.artifact(build, step).manifest["metrics"]
            assert m["n"] == len(rated) and m["failures"] == 6 - len(rated)
            assert m["rating"] == pytest.approx(statistics.fmean(rated))
            assert (api.artifact(build, step).files_dir / "judge_template.txt").read_text().startswith("Please act")
        code, out, err = cli("diff", str(recipe), str(recipe), "--json")
        assert code == 0, err
        scores = {(e["task"], e["metric"]): e for e in json.loads(out)["scores"]}
        assert {"rating", "reward", "rouge_l", "bleu", "chrf"} <= {m for _, m in scores}
        assert scores["judge.llm", "rating"]["a"]["gain"]["paired"]  # per-example ratings: paired
        assert not scores["judge.reference", "bleu"]["a"]["gain"]["paired"]  # corpus BLEU: from the two stderrs
        asked = len(judge.requests)
        assert 0 < asked <= 12  # an answer both models gave is judged once
        # the judge moves to another address: its judgements stand, nobody asks it again
        other = Judge()
        write(other.url)
        states = step_states(apply_json(cli, str(recipe)))
        assert "built" in (states["judge.llm"], states["judge.base.llm"])  # the same answers: one key, one build
        assert other.requests == [] and len(judge.requests) == asked

        # the reward model's scores, as the model itself gives them
        model = BertForSequenceClassification.from_pretrained(rm).eval()
        tok = AutoTokenizer.from_pretrained(rm)
        answers = api.table(build, "answers", "answers").to_pylist()
        with torch.no_grad():
            want = {a["id"]: model(**tok(a["prompt"], a["answer"], return_tensors="pt")).logits[0, 0].item()
                    for a in answers}  # fmt: skip
        got = {r["id"]: r["reward"] for r in api.table(build, "judge.reward", "judgements").to_pylist()}
        assert got == pytest.approx(want, abs=1e-5)

        # a judge that is down: a clear error naming it
        port = other.server_address[1]
        other.shutdown()
        other.server_close()
        recipe.write_text(recipe.read_text().replace("model: judge-7b", "model: judge-8b"))
        code, _, err = cli("apply", str(recipe))
        assert code != 0 and f"judge llm at http://127.0.0.1:{port}/v1/chat/completions cannot be reached" in err
    finally:
        judge.shutdown()


@pytest.mark.slow
def test_a_judge_that_rates_nothing_is_an_error_not_a_zero(tmp_path: Path, cli: Any) -> None:
    judge = Judge()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    recipe = tmp_path / "r.yaml"
    template = "Rate this: {answer}"  # the stand-in finds no answer markers in it: it cannot rate
    recipe.write_text(
        tiny_model_recipe(
            rest=f"train: {{seq_len: 64, epochs: 1}}\neval:\n  judge: {{prompts: {prompts}, reference: false, "
            f"llm: {{url: '{judge.url}', model: j, template: '{template}'}}}}\n"
        )
    )
    try:
        code, _, err = cli("apply", str(recipe))
    finally:
        judge.shutdown()
    assert code != 0 and "judge llm rated none of 1 answers" in err


def test_a_bad_prompt_file_names_its_line(tmp_path: Path, cli: Any) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n\n{"question": "no prompt key"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_model_recipe(rest=f"train: {{seq_len: 64, epochs: 1}}\neval: {{judge: {{prompts: {prompts}}}}}\n")
    )
    code, _, err = cli("apply", str(recipe))
    assert code != 0 and f"{prompts} line 3: expected a JSON object with a `prompt` string" in err
