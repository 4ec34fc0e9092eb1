"""runner compare: pairwise judgements in both orders, win rates with bootstrap intervals, a Bradley-Terry
ranking, and the answers and verdicts as tables."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runner import api
from runner.compare import bradley_terry, combine, win_rate_interval
from tests.conftest import apply_json, tiny_model_recipe, write_jsonl


def test_a_verdict_counts_only_when_both_orders_agree() -> None:
    assert combine("A", "B") == "x" and combine("B", "A") == "y"  # the same winner in both positions
    assert combine("A", "A") == "tie"  # whoever comes first wins: position bias, cancelled
    assert combine("C", "A") == "tie" and combine("C", "C") == "tie"
    assert combine(None, "A") is None and combine("B", None) is None  # no verdict: a failure, not a tie


def test_the_win_rate_interval_is_a_percentile_bootstrap() -> None:
    outcomes = [1.0] * 30 + [0.5] * 10 + [0.0] * 20
    low, high = win_rate_interval(outcomes)
    rng = np.random.default_rng(5)  # our own resampling, other draws
    means = np.array(outcomes)[rng.integers(0, 60, (4000, 60))].mean(axis=1)
    assert low == pytest.approx(np.percentile(means, 2.5), abs=0.02)
    assert high == pytest.approx(np.percentile(means, 97.5), abs=0.02)
    assert low < np.mean(outcomes) < high


def test_bradley_terry_recovers_the_strengths_that_made_the_games() -> None:
    """Games drawn from known Elo ratings: the fit puts them back in order, near their spacing."""
    truth = {"a": 1200.0, "b": 1000.0, "c": 800.0}
    rng = np.random.default_rng(0)
    games = []
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        p = 1 / (1 + 10 ** ((truth[y] - truth[x]) / 400))
        games += [(x, y, float(s)) for s in rng.random(400) < p]
    elo = bradley_terry(list(truth), games)
    assert sorted(elo, key=lambda m: -elo[m]) == ["a", "b", "c"]
    assert elo["a"] - elo["b"] == pytest.approx(200, abs=60) and elo["b"] - elo["c"] == pytest.approx(200, abs=60)


class PairJudge(ThreadingHTTPServer):
    """A stand-in for a judge model comparing two answers: the longer one wins; of two as long, it picks the first
    it was shown (a position bias). It counts the pairs it is asked about (a single answer gets a rating of 5)."""

    def __init__(self) -> None:
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][0]["content"]
                found = re.findall(r"\[The Start of Assistant [AB]'s Answer\]\n(.*?)\n\[The End", text, flags=re.S)
                if len(found) == 2:
                    server.requests += 1
                    verdict = "[[B]]" if len(found[1]) > len(found[0]) else "[[A]]"
                else:
                    verdict = "Rating: [[5]]"
                data = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"So: {verdict}"}}]}
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(data).encode())

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.slow
def test_compare_three_recipes_with_an_llm_judge(tmp_path: Path, cli: Any) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": q} for q in ("Hi", "Name a river.", "What is 2+2?")])
    judge = PairJudge()
    recipes = []
    for tokens in (1, 3, 6):  # one model, answering at three lengths: three "models" for the judge
        recipe = tmp_path / f"m{tokens}.yaml"
        recipe.write_text(
            tiny_model_recipe(
                head=f"name: m{tokens}\n",
                rest="train: {seq_len: 64, epochs: 1}\neval:\n  max_new_tokens: 2\n"
                f"  judge: {{prompts: {prompts}, max_new_tokens: {tokens}, reference: false, "
                f"llm: {{url: 'http://127.0.0.1:{judge.server_address[1]}/v1', model: pair-judge}}}}\n",
            )
        )
        apply_json(cli, str(recipe))
        recipes.append(str(recipe))
    try:
        code, out, err = cli("compare", *recipes, "--json", "--out", str(tmp_path / "cmp"))
        assert code == 0, err
        asked = judge.requests
        again = cli("compare", *recipes, "--json")
        assert again[0] == 0 and judge.requests == asked  # memoized: nothing asked twice
    finally:
        judge.shutdown()
    result = json.loads(out)
    answers = {
        f"m{t}": {r["id"]: r["answer"] for r in api.table(api.load(r), "answers", "answers").to_pylist()}
        for t, r in zip((1, 3, 6), recipes, strict=True)
    }
    assert asked == 3 * 3 * 2  # 3 pairs x 3 prompts x both orders
    for pair in result["pairs"]:
        x, y = answers[pair["a"]], answers[pair["b"]]
        wins = sum(len(x[i]) > len(y[i]) for i in x)
        losses = sum(len(x[i]) < len(y[i]) for i in x)
        assert (pair["wins"], pair["losses"], pair["ties"]) == (wins, losses, 3 - wins - losses), pair
        assert pair["win_rate"] == pytest.approx((wins + 0.5 * (3 - wins - losses)) / 3)
        assert pair["low"] <= pair["win_rate"] <= pair["high"]
    lengths = {m: sum(len(a) for a in by_id.values()) for m, by_id in answers.items()}
    ranked = [e["model"] for e in result["elo"]]
    assert [lengths[m] for m in ranked] == sorted(lengths.values(), reverse=True)
    code, out, err = cli("sql", str(tmp_path / "cmp"), "select model_a, model_b, winner from verdicts", "--json")
    assert code == 0, err
    verdicts = json.loads(out)
    assert len(verdicts) == 9 and {v["winner"] for v in verdicts} <= {"m1", "m3", "m6", "tie"}
    code, _, err = cli("sql", str(tmp_path / "cmp"), "select * from read_parquet('/etc/passwd')")
    assert code != 0 and "SQL" in err
