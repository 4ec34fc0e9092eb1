"""runner compare: which recipe's tuned model answers better, pair by pair, judged."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runner.cli.common import cache_arg, console, print_json


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="judge the tuned models of several recipes against each other on the same held-out prompts",
        description="Each recipe's `answers` step (its eval.judge section; run apply first) holds its tuned "
        "model's answers to the same held-out prompts. A judge from the first recipe's eval.judge picks the better "
        "answer of every pair: an LLM judge sees both orders and a win counts only when they agree (else a tie); "
        "a reward model prefers the higher score. Per pair: wins, ties, losses and the win rate (ties half) with "
        "a 95%% bootstrap interval over the prompts; with three or more recipes, a Bradley-Terry ranking on the "
        "Elo scale. Judgements are memoized: a re-run asks the judge nothing new.",
        epilog="example: runner compare a.yaml b.yaml c.yaml --out cmp/ && runner sql cmp/ "
        '"select winner, count(*) from verdicts group by winner"',
    )
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="two or more recipe paths")
    p.add_argument("--judge", choices=("llm", "reward"), help="default: the LLM judge if the first recipe has one")
    p.add_argument("--out", type=Path, help="write answers.parquet and verdicts.parquet here (for `runner sql DIR`)")
    p.add_argument("--json", action="store_true", help="the summary and verdicts as JSON")
    cache_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from runner import api
    from runner.compare import compare_recipes, write_tables
    from runner.errors import UsageError

    if len(args.recipes) < 2:
        raise UsageError("compare needs two or more recipes")
    builds = [api.load(r, cache_dir=args.cache_dir, cache_remote=args.cache_remote) for r in args.recipes]
    err = console(stderr=True)
    result = compare_recipes(builds, args.judge, lambda total, done: err.print(f"  judged {done}/{total}", end="\r"))
    if args.out:
        write_tables(args.out, result["answers"], result["verdicts"])
    if args.json:
        print_json({k: v for k, v in result.items() if k != "answers"})
        return 0
    out = console()
    out.print(_text(result))
    return 0


def _text(r: dict[str, Any]) -> str:
    lines = [f"judge: {r['judge']}"]
    for p in r["pairs"]:
        rate = "-" if p["win_rate"] is None else f"{p['win_rate']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"
        failed = f", {p['failures']} without a verdict" if p["failures"] else ""
        lines.append(
            f"{p['a']} vs {p['b']}: {p['wins']} wins, {p['ties']} ties, {p['losses']} losses{failed}; win rate {rate}"
        )
    for e in r.get("elo", []):
        lines.append(f"  {e['elo']:7.1f}  {e['model']}")
    return "\n".join(lines)
