"""`runner compare A.yaml B.yaml [C.yaml ...]`: the tuned models of several recipes answer the same held-out
prompts (each recipe's `answers` step, from `eval.judge`), and a judge picks the better answer of every pair.

- An LLM judge sees each pair in both orders; a winner is one only when both orders agree, anything else is a
  tie (the judge's position bias cancels). A reply without a verdict is a recorded failure, not a tie.
- A reward model scores each answer once; the higher score wins, equal scores tie.

Per pair: wins, ties and losses, the win rate (ties count half) with a 95% bootstrap interval over the prompts;
with more than two models, a Bradley-Terry fit on the Elo scale. Judgements are memoized by (judge, prompt,
answers) like `eval.judge`'s, so a comparison re-run asks the judge nothing new."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError

PAIR = """Please act as an impartial judge and evaluate the responses of two AI assistants to the user question \
displayed below. Choose the assistant that answers the question better: consider helpfulness, relevance, accuracy, \
depth and level of detail. Do not let the order of the responses, their length or the assistants' names influence \
you. Begin with a short explanation, then give your verdict in exactly this format: "[[A]]" if assistant A is \
better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.

[User Question]
{question}

[The Start of Assistant A's Answer]
{answer_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{answer_b}
[The End of Assistant B's Answer]"""
VERDICT = re.compile(r"\[\[([ABC])\]\]")


@dataclass
class Pair:
    a: str
    b: str
    wins: int  # a beat b
    ties: int
    losses: int
    failures: int
    win_rate: float | None  # a's, ties counting half
    low: float | None
    high: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def win_rate_interval(outcomes: list[float], draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of the mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss)."""
    rng = random.Random(seed)
    n = len(outcomes)
    means = sorted(sum(outcomes[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def bradley_terry(models: list[str], games: list[tuple[str, str, float]], iterations: int = 1000) -> dict[str, float]:
    """Strengths from (a, b, a's score: 1, 0.5 or 0) by Hunter's MM algorithm, on the Elo scale (400 log10, mean
    1000). A tiny prior (one tie against an average model each) keeps an unbeaten model finite."""
    wins = {m: 0.5 for m in models}
    played: dict[tuple[str, str], int] = {}
    for a, b, s in games:
        wins[a] += s
        wins[b] += 1 - s
        played[a, b] = played.get((a, b), 0) + 1
    p = {m: 1.0 for m in models}
    for _ in range(iterations):
        new = {}
        for m in models:
            denom = 1 / (p[m] + 1.0)  # the prior's game, against strength 1
            for (a, b), n in played.items():
                if m in (a, b):
                    denom += n / (p[a] + p[b])
            new[m] = wins[m] / denom
        mean = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        p = {m: v / mean for m, v in new.items()}
    return {m: 1000 + 400 * math.log10(v) for m, v in p.items()}


def llm_verdict(ask: Callable[[str], str], question: str, first: str, second: str) -> tuple[str | None, str]:
    """ "A", "B", "C" (tie) or None (no verdict), and the judge's reply."""
    reply = ask(PAIR.format(question=question, answer_a=first, answer_b=second))
    found = VERDICT.findall(reply)
    return (found[-1] if found else None), reply


def combine(forward: str | None, backward: str | None) -> str | None:
    """One outcome for (x, y) from the verdicts on (x, y) and on (y, x): "x", "y" or "tie"; None on a failure."""
    if forward is None or backward is None:
        return None
    first = {"A": "x", "B": "y", "C": "tie"}[forward]
    second = {"A": "y", "B": "x", "C": "tie"}[backward]
    return first if first == second else "tie"


def outcomes_table(
    answers: dict[str, dict[str, dict[str, Any]]], judge: Callable[[str, str, str], tuple[str | None, str]]
) -> list[dict[str, Any]]:
    """A verdict row per (prompt, pair of models): `judge(question, x_answer, y_answer)` gives "x", "y", "tie" or
    None and its detail."""
    models = list(answers)
    ids = sorted(set.intersection(*(set(v) for v in answers.values())))
    rows = []
    for i, x in enumerate(models):
        for y in models[i + 1 :]:
            for pid in ids:
                question = answers[x][pid]["prompt"]
                outcome, detail = judge(question, answers[x][pid]["answer"], answers[y][pid]["answer"])
                winner = {"x": x, "y": y, "tie": "tie", None: None}[outcome]
                rows.append({"id": pid, "model_a": x, "model_b": y, "winner": winner, "detail": detail})
    return rows


def summarize(models: list[str], verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pair: wins, ties, losses, failures and the win rate with its interval; Elo with more than two models."""
    pairs, games = [], []
    for i, x in enumerate(models):
        for y in models[i + 1 :]:
            rows = [v for v in verdicts if v["model_a"] == x and v["model_b"] == y]
            scores = [1.0 if v["winner"] == x else 0.5 if v["winner"] == "tie" else 0.0 for v in rows if v["winner"]]
            games += [(x, y, s) for s in scores]
            low, high = win_rate_interval(scores) if scores else (None, None)
            pairs.append(
                Pair(
                    x,
                    y,
                    wins=sum(s == 1.0 for s in scores),
                    ties=sum(s == 0.5 for s in scores),
                    losses=sum(s == 0.0 for s in scores),
                    failures=len(rows) - len(scores),
                    win_rate=sum(scores) / len(scores) if scores else None,
                    low=low,
                    high=high,
                ).as_dict()
            )
    out: dict[str, Any] = {"models": models, "pairs": pairs}
    if len(models) > 2:
        elo = bradley_terry(models, games)
        out["elo"] = [{"model": m, "elo": elo[m]} for m in sorted(models, key=lambda m: -elo[m])]
    return out


def model_answers(builds: list[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each recipe's tuned answers by prompt id, named by the recipe (its file name when names repeat)."""
    from runner import api

    names = [b.loaded.name for b in builds]
    if len(set(names)) < len(names):
        names = [str(b.loaded.path) for b in builds]
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for name, build in zip(names, builds, strict=True):
        if "answers" not in build.graph.nodes:
            raise RunnerError(f"{build.loaded.path} has no eval.judge section, so no answers to compare")
        art = api.artifact(build, "answers")
        if art is None:
            raise RunnerError(f"{build.loaded.path}: its answers are not built; run `runner apply` on it first")
        rows = api.table(build, "answers", "answers").to_pylist()
        found[name] = {r["id"]: r for r in rows}
    first = next(iter(found.values()))
    ids = set.intersection(*(set(v) for v in found.values()))
    if not ids:
        raise RunnerError("the recipes answered no prompt in common (their eval.judge prompts differ)")
    for name, rows in found.items():
        for pid in ids:
            if rows[pid]["prompt"] != first[pid]["prompt"]:
                raise RunnerError(
                    f"prompt {pid} reads differently in {name}: the recipes render prompts differently "
                    "(another template?), so their answers cannot be compared"
                )
    return found


def write_tables(out: Path, answers: dict[str, dict[str, dict[str, Any]]], verdicts: list[dict[str, Any]]) -> None:
    """answers.parquet (model, id, prompt, reference, answer) and verdicts.parquet, for `runner sql OUT`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rows = [{"model": m, **r} for m, by_id in answers.items() for r in by_id.values()]
    pq.write_table(pa.Table.from_pylist(rows), out / "answers.parquet")
    schema = pa.schema([(k, pa.string()) for k in ("id", "model_a", "model_b", "winner", "detail")])
    pq.write_table(pa.Table.from_pylist(verdicts, schema=schema), out / "verdicts.parquet")


def compare_recipes(
    builds: list[Any], judge: str | None = None, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Compare the tuned models of built recipes (api.Build) with the first recipe's `eval.judge` judge (`llm` or
    `reward`; default: its LLM judge if it has one). Returns the summary, with the answers and verdicts."""
    from runner.steps.embedding import model_files
    from runner.steps.judge import Memo, chat

    answers = model_answers(builds)
    config = builds[0].loaded.recipe.eval.judge if builds[0].loaded.recipe.eval else None
    kind = judge or ("llm" if config and config.llm else "reward")
    memo_dir = builds[0].cache.root / "memo" / "judgements"
    memo_dir.mkdir(parents=True, exist_ok=True)
    total = len(answers) * (len(answers) - 1) // 2 * len(set.intersection(*(set(v) for v in answers.values())))
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(total, done[0])

    if kind == "llm":
        if config is None or config.llm is None:
            raise RunnerError(f"{builds[0].loaded.path} has no eval.judge.llm to judge with")
        llm = config.llm
        memo = Memo(memo_dir, "pair:" + llm.identity() + PAIR)

        def ask(question: str, first: str, second: str) -> tuple[str | None, str]:
            got = memo.get(question, first, second)
            if got is None:
                verdict, reply = llm_verdict(lambda text: chat(llm, text), question, first, second)
                got = {"verdict": verdict, "reply": reply}
                memo.put(got, question, first, second)
            return got["verdict"], got["reply"]

        def judged(question: str, x: str, y: str) -> tuple[str | None, str]:
            forward, backward = ask(question, x, y), ask(question, y, x)
            tick()
            return combine(forward[0], backward[0]), f"x first: {forward[1]}\n\ny first: {backward[1]}"

    elif kind == "reward":
        if config is None or config.reward is None:
            raise RunnerError(f"{builds[0].loaded.path} has no eval.judge.reward to judge with")
        model_dir = (builds[0].loaded.base_dir(("eval", "judge", "reward")) / config.reward).resolve()
        memo = Memo(memo_dir, "reward:" + model_files(str(model_dir), {}))
        scores = _reward_scores(model_dir, memo, answers, config.batch_size)

        def judged(question: str, x: str, y: str) -> tuple[str | None, str]:
            sx, sy = scores[question, x], scores[question, y]
            tick()
            outcome = "tie" if math.isclose(sx, sy, rel_tol=0, abs_tol=1e-6) else ("x" if sx > sy else "y")
            return outcome, f"rewards {sx:.6g} and {sy:.6g}"

    else:
        raise RunnerError(f"judge {kind!r}: choose llm or reward")
    verdicts = outcomes_table(answers, judged)
    summary = summarize(list(answers), verdicts)
    return {"judge": kind, **summary, "answers": answers, "verdicts": verdicts}


def _reward_scores(
    model_dir: Path, memo: Any, answers: dict[str, dict[str, dict[str, Any]]], batch_size: int
) -> dict[tuple[str, str], float]:
    """(prompt, answer) -> the reward model's score, scoring only what the memo does not hold."""
    import pyarrow as pa

    from runner.steps.scoring import reward_scores

    pairs = {(r["prompt"], r["answer"]) for by_id in answers.values() for r in by_id.values()}
    todo = sorted(p for p in pairs if memo.get(*p) is None)
    if todo:
        table = pa.table({"prompt": [p for p, _ in todo], "response": [a for _, a in todo]})
        for pair, score in zip(todo, reward_scores(model_dir, table, batch_size, lambda *a: None), strict=True):
            memo.put({"reward": score}, *pair)
    return {p: float(memo.get(*p)["reward"]) for p in pairs}
