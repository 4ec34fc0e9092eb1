"""`eval.judge`: the answers of the base and the tuned model (`answers` steps) scored three ways, as H2O LLM
Studio and h2oGPT score them:

- `reference`: against the held-out replies, BLEU and chrF (sacrebleu; corpus scores, their stderr by bootstrap
  over the prompts) and ROUGE-L (rouge-score; mean F1 and its stderr);
- `reward`: a reward model (a local sequence-classification directory, as the `quality` filter takes) scores each
  (prompt, answer);
- `llm`: an LLM judge behind any OpenAI-compatible endpoint rates each answer 1-10, with the prompt template
  recorded. A judge that cannot be reached is an error; an answer it does not rate is a recorded per-row failure.

A judgement depends only on (judge, prompt, answer): reward and LLM judgements are memoized by that, so re-judging
after a change that leaves an answer as it was costs nothing."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.answers import AnswersConfig

RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
SINGLE = """Please act as an impartial judge and evaluate the quality of the response provided by an AI \
assistant to the user question displayed below. Consider its helpfulness, relevance, accuracy, depth and level of \
detail. Begin with a short explanation, be as objective as possible, then rate the response on a scale of 1 to 10 \
in exactly this format: "[[rating]]", for example "Rating: [[5]]".

[Question]
{question}

[The Start of Assistant's Answer]
{answer}
[The End of Assistant's Answer]"""


class LlmJudge(Params):
    """An LLM behind an OpenAI-compatible endpoint (vLLM, llama.cpp's server, `runner serve`, a hosted API)."""

    url: str = Field(description="the API's base URL, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the judge model's name at that endpoint")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (never the key)")
    template: str = Field(SINGLE, description="the judge's prompt; {question} and {answer} are filled in")
    max_tokens: int = Field(512, ge=1)
    timeout: float = Field(120.0, gt=0, description="seconds to wait for one judgement")

    def identity(self) -> str:
        """What a judgement depends on (not where the judge is served)."""
        return json.dumps([self.model, self.template, self.max_tokens])


class JudgeConfig(AnswersConfig):
    """How the answers to held-out prompts are judged."""

    DIR_FIELDS = frozenset({"reward"})

    reference: bool = Field(True, description="BLEU, chrF and ROUGE-L against the held-out replies")
    reward: str | None = Field(None, description="reward model directory (a sequence-classification model)")
    llm: LlmJudge | None = None

    def external_paths(self) -> dict[str, str]:
        return super().external_paths() | ({"reward": self.reward} if self.reward else {})

    def kinds(self) -> list[str]:
        return [k for k, on in (("reference", self.reference), ("reward", self.reward), ("llm", self.llm)) if on]


class JudgeParams(Params):
    DIR_FIELDS = frozenset({"reward"})

    kind: Literal["reference", "reward", "llm"]
    reward: str | None = None
    llm: LlmJudge | None = None
    batch_size: int = 8

    def external_paths(self) -> dict[str, str]:
        return {"reward": self.reward} if self.kind == "reward" and self.reward else {}


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """The mean and its standard error (sample standard deviation / sqrt(n))."""
    if not values:
        return None, None
    if len(values) < 2:
        return statistics.fmean(values), None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def reference_scores(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-row sentence BLEU, sentence chrF and ROUGE-L F1; corpus BLEU and chrF with bootstrap stderr, mean
    ROUGE-L with its stderr. Rows without a reference are left out."""
    import random

    import sacrebleu
    from rouge_score import rouge_scorer

    scored = [r for r in rows if r.get("reference")]
    if not scored:
        raise StepError("judge reference: no prompt has a reference reply to compare with")
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out = []
    for r in scored:
        out.append(
            {
                "id": r["id"],
                "sentence_bleu": sacrebleu.sentence_bleu(r["answer"], [r["reference"]]).score,
                "sentence_chrf": sacrebleu.sentence_chrf(r["answer"], [r["reference"]]).score,
                "rouge_l": rouge.score(r["reference"], r["answer"])["rougeL"].fmeasure,
            }
        )
    hyps, refs = [r["answer"] for r in scored], [r["reference"] for r in scored]
    metrics: dict[str, Any] = {"n": len(scored)}
    rng = random.Random(0)
    draws = [[rng.randrange(len(hyps)) for _ in hyps] for _ in range(200)]
    for name, metric in (("bleu", sacrebleu.BLEU()), ("chrf", sacrebleu.CHRF())):
        # a corpus score is a function of its sentences' summed statistics: each resampled corpus sums the ones
        # of its draw (as sacrebleu's own paired bootstrap does), equal to scoring that corpus anew
        stats = metric._extract_corpus_statistics(hyps, [refs])
        metrics[name] = metric._compute_score_from_stats(_summed(stats, range(len(hyps)))).score
        boot = [metric._compute_score_from_stats(_summed(stats, d)).score for d in draws]
        metrics[f"{name}_stderr"] = statistics.stdev(boot)
    metrics["rouge_l"], metrics["rouge_l_stderr"] = mean_se([r["rouge_l"] for r in out])
    return out, metrics


def _summed(stats: list[list[Any]], rows: Any) -> list[Any]:
    return [sum(column) for column in zip(*(stats[i] for i in rows), strict=True)]


class Memo:
    """Judgements already made, by (judge, prompt, answer): a file each under the step's memo directory."""

    def __init__(self, folder: Path, judge: str) -> None:
        self.folder, self.judge = folder, judge

    def path(self, *texts: str) -> Path:
        from blake3 import blake3

        return self.folder / f"{blake3(json.dumps([self.judge, *texts]).encode()).hexdigest()}.json"

    def get(self, *texts: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.path(*texts).read_text()))
        except (OSError, ValueError):
            return None

    def put(self, value: dict[str, Any], *texts: str) -> None:
        path = self.path(*texts)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)


def reward_judgements(ctx: StepContext, p: JudgeParams, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import pyarrow as pa

    from runner.steps.embedding import model_files
    from runner.steps.scoring import reward_scores

    assert p.reward is not None
    memo = Memo(ctx.memo("judgements"), "reward:" + model_files(p.reward, ctx.files))
    todo = [r for r in rows if memo.get(r["prompt"], r["answer"]) is None]
    if todo:
        table = pa.table({"prompt": [r["prompt"] for r in todo], "response": [r["answer"] for r in todo]})
        for r, score in zip(todo, reward_scores(ctx.files[p.reward], table, p.batch_size, ctx.progress), strict=True):
            memo.put({"reward": score}, r["prompt"], r["answer"])
    return [{"id": r["id"], **(memo.get(r["prompt"], r["answer"]) or {})} for r in rows]


def chat(judge: LlmJudge, content: str) -> str:
    """One answer of the judge (temperature 0). Raises StepError when the judge cannot be reached or refuses."""
    import urllib.error
    import urllib.request

    body = {
        "model": judge.model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": judge.max_tokens,
    }
    headers = {"Content-Type": "application/json"}
    if judge.api_key_env:
        key = os.environ.get(judge.api_key_env)
        if not key:
            raise StepError(f"judge llm: ${judge.api_key_env} is not set (it holds the judge's API key)")
        headers["Authorization"] = f"Bearer {key}"
    url = judge.url.rstrip("/") + "/chat/completions"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=judge.timeout) as r:
            reply = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise StepError(f"judge llm at {url} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StepError(f"judge llm at {url} cannot be reached ({reason}); is it running?") from None
    except ValueError:
        raise StepError(f"judge llm at {url} did not answer JSON") from None
    try:
        return str(reply["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise StepError(f"judge llm at {url} answered without choices[0].message.content") from None


def llm_judgements(ctx: StepContext, p: JudgeParams, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each answer rated 1-10; a reply without a rating in range is that row's failure (with the reply kept)."""
    assert p.llm is not None
    memo = Memo(ctx.memo("judgements"), "llm:" + p.llm.identity())
    out = []
    for n, r in enumerate(rows, 1):
        done = memo.get(r["prompt"], r["answer"])
        if done is None:
            reply = chat(p.llm, p.llm.template.format(question=r["prompt"], answer=r["answer"]))
            found = RATING.findall(reply)
            rating = float(found[-1]) if found else None
            failure = None
            if rating is None:
                failure = "no [[rating]] in the judge's reply"
            elif not 1 <= rating <= 10:
                rating, failure = None, f"rating {found[-1]} is outside 1-10"
            done = {"rating": rating, "judge_reply": reply, "failure": failure}
            memo.put(done, r["prompt"], r["answer"])
        out.append({"id": r["id"], **done})
        ctx.progress(len(rows), n, "judgements")
    return out


@step("judge", version="1", params=JudgeParams, libs=("sacrebleu", "rouge-score", "torch", "transformers"))
def judge(ctx: StepContext) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p: JudgeParams = ctx.params
    answers = ctx.input()
    rows = pq.read_table(answers.file(answers.manifest["tables"]["answers"])).to_pylist()
    if p.kind == "reference":
        out, metrics = reference_scores(rows)
        ctx.metrics.update(metrics)
    elif p.kind == "reward":
        out = reward_judgements(ctx, p, rows)
        mean, se = mean_se([r["reward"] for r in out])
        ctx.metrics.update({"n": len(out), "reward": mean, "reward_stderr": se})
    else:
        out = llm_judgements(ctx, p, rows)
        assert p.llm is not None
        (ctx.out / "judge_template.txt").write_text(p.llm.template)
        ratings = [r["rating"] for r in out if r["rating"] is not None]
        mean, se = mean_se(ratings)
        failed = len(out) - len(ratings)
        ctx.metrics.update({"n": len(ratings), "failures": failed, "rating": mean, "rating_stderr": se})
        if not ratings:
            first = next(r for r in out if r["failure"])
            raise StepError(
                f"judge llm rated none of {len(out)} answers ({first['failure']}; e.g. it said "
                f"{first['judge_reply'][:200]!r}); is {p.llm.model} a model that follows the judge's template?"
            )
    pq.write_table(pa.Table.from_pylist(out), ctx.table("judgements", "judgements.parquet", len(out)))
