"""Compare two recipes (or one recipe at two git revisions): changed values, changed step keys, and for
outputs built on both sides: row counts per step, which rows were added or removed (and which step
decided), metric changes, and generations side by side."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.keypaths import flatten

DATA_KINDS = ("source.", "mix", "filter.")


@contextmanager
def recipe_at(arg: str) -> Iterator[Path]:
    """`path.yaml` as is, or `path.yaml@REV`: the recipe as committed at REV, written beside the current one
    (so its relative paths resolve to the same files) and removed afterwards."""
    path, sep, rev = arg.partition("@")
    if not sep:
        yield Path(path)
        return
    p = Path(path).resolve()
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=p.parent, capture_output=True, text=True, check=True
        ).stdout.strip()
        text = subprocess.run(
            ["git", "show", f"{rev}:{p.relative_to(top).as_posix()}"],
            cwd=top,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise RunnerError(f"cannot read {path} at git revision {rev}: {detail.strip()}") from None
    tmp = p.with_name(f".{p.stem}@{rev.replace('/', '_').replace('~', '-')}{p.suffix}")
    tmp.write_text(text)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def compare(a: Any, b: Any) -> dict[str, Any]:
    """The whole comparison as plain data (for --json); `a` and `b` are api.Build objects."""
    from runner import api

    fa, fb = flatten(a.loaded.raw), flatten(b.loaded.raw)
    params = [{"path": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    plan_a = {p.name: p for p in api.plan(a)}
    plan_b = {p.name: p for p in api.plan(b)}
    names = list(dict.fromkeys(list(plan_a) + list(plan_b)))
    steps = []
    for n in names:
        pa, pb = plan_a.get(n), plan_b.get(n)
        steps.append(
            {
                "step": n,
                "a": pa.key if pa else None,
                "b": pb.key if pb else None,
                "a_built": bool(pa and pa.state == "cached"),
                "b_built": bool(pb and pb.state == "cached"),
                "changed": (pa.key if pa else None) != (pb.key if pb else None) or not (pa and pb),
            }
        )
    arts_a = {n: art for n, p in plan_a.items() if p.state == "cached" and p.key and (art := a.cache.get(p.key))}
    arts_b = {n: art for n, p in plan_b.items() if p.state == "cached" and p.key and (art := b.cache.get(p.key))}
    counts = [
        {
            "step": n,
            "a": arts_a[n].manifest.get("rows") if n in arts_a else None,
            "b": arts_b[n].manifest.get("rows") if n in arts_b else None,
        }
        for n in names
        if (art := arts_a.get(n) or arts_b.get(n)) is not None and art.manifest.get("rows")
    ]
    metrics = []
    for n in names:
        if n not in arts_a or n not in arts_b:  # compared only where both sides are built
            continue
        if arts_a[n].manifest.get("kind") in SCORED:  # with their intervals, under "scores"
            continue
        ma, mb = arts_a[n].manifest.get("metrics", {}), arts_b[n].manifest.get("metrics", {})
        for k in sorted(set(ma) | set(mb)):
            va, vb = ma.get(k), mb.get(k)
            numeric = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
            # timings are not results; a stderr goes with its metric
            if numeric and va != vb and not k.endswith(("_seconds", "_stderr")):
                row = {"step": n, "metric": k, "a": va, "b": vb}
                n_b = int(mb.get("n") or mb.get("val_examples") or 0)
                if change := _unpaired(va, ma.get(f"{k}_stderr"), vb, mb.get(f"{k}_stderr"), n_b):
                    row["change"] = change.as_dict()
                metrics.append(row)
    return {
        "a": str(a.loaded.path),
        "b": str(b.loaded.path),
        "params": params,
        "steps": steps,
        "rows": counts,
        "row_changes": _row_changes(a, b, plan_a, plan_b, arts_a, arts_b),
        "metrics": metrics,
        "generations": _generations(arts_a.get("eval"), arts_b.get("eval"), a, b),
        "scores": _scores(a, b, arts_a, arts_b),
    }


# the step kinds that score a model per example, base and tuned (KIND.X and KIND.base.X): their table and its key
SCORED = {"harness": ("samples", "doc_id"), "judge": ("judgements", "id")}


def _scored(build: Any, art: Any) -> dict[str, dict[Any, float]]:
    """metric -> (example -> its score), for each per-example column of a scoring step's table."""
    from runner import api
    from stores.datastore import connect

    table, key = SCORED[art.manifest["kind"]]
    sql = api.table_sqls(build.cache, art.key).get(table)
    con = connect()
    try:
        rows = con.sql(f"select * from {sql}").to_arrow_table().to_pylist()
    finally:
        con.close()
    metrics = [m for m in art.manifest.get("metrics", {}) if rows and m in rows[0]]
    return {m: {r[key]: r[m] for r in rows if r[m] is not None} for m in metrics}


def _scores(a: Any, b: Any, arts_a: dict[str, Any], arts_b: dict[str, Any]) -> list[dict[str, Any]]:
    """Each harness task's and judge's metrics: base and tuned on each side (value, stderr, n), the tuning's gain
    on each side and the change of the tuned model from A to B, each with its 95% interval (paired on the examples
    both scored, where the metric is a mean of per-example scores; else from the two stderrs)."""
    from runner.intervals import paired

    tuned_steps = sorted(
        {
            n
            for arts in (arts_a, arts_b)
            for n, art in arts.items()
            if art.manifest.get("kind") in SCORED and ".base." not in n
        }
    )
    out = []
    for step in tuned_steps:
        kind, _, what = step.partition(".")
        task = what if kind == "harness" else step
        base_step = f"{kind}.base.{what}"
        sides = {
            "a": (a, arts_a.get(base_step), arts_a.get(step)),
            "b": (b, arts_b.get(base_step), arts_b.get(step)),
        }
        metrics = sorted(
            {
                k.removesuffix("_stderr")
                for _, *arts in sides.values()
                for art in arts
                if art is not None
                for k in art.manifest.get("metrics", {})
                if k.endswith("_stderr")
            }
        )
        # each step's per-example scores, read once (a corpus score such as BLEU has none: {})
        per_example = {
            (side, which): _scored(build, art)
            for side, (build, *arts) in sides.items()
            for which, art in zip(("base", "tuned"), arts, strict=True)
            if art is not None
        }
        for m in metrics:
            entry: dict[str, Any] = {"task": task, "metric": m}
            scores = {where: found.get(m, {}) for where, found in per_example.items()}
            for side, (_, base, tuned) in sides.items():
                row: dict[str, Any] = {}
                for which, art in (("base", base), ("tuned", tuned)):
                    if art is not None:
                        got = art.manifest["metrics"]
                        row[which] = {"value": got.get(m), "stderr": got.get(f"{m}_stderr"), "n": got.get("n")}
                if "base" in row and "tuned" in row:
                    gain = paired(scores[side, "base"], scores[side, "tuned"]) or _between(row["base"], row["tuned"])
                    row["gain"] = gain.as_dict() if gain else None
                entry[side] = row
            if ("a", "tuned") in scores and ("b", "tuned") in scores:
                change = paired(scores["a", "tuned"], scores["b", "tuned"])
                change = change or _between(entry["a"]["tuned"], entry["b"]["tuned"])
                entry["change"] = change.as_dict() if change else None
            out.append(entry)
    return out


def _between(x: dict[str, Any], y: dict[str, Any]) -> Any:
    """y - x from two scores ({value, stderr, n})."""
    return _unpaired(x["value"], x["stderr"], y["value"], y["stderr"], min(x["n"] or 0, y["n"] or 0))


def _unpaired(a: Any, se_a: Any, b: Any, se_b: Any, n: int) -> Any:
    """b - a from two values and their stderrs (None when any is missing)."""
    from runner.intervals import unpaired

    return None if None in (a, se_a, b, se_b) else unpaired(a, se_a, b, se_b, n)


def _last_data_step(names: list[str]) -> str | None:
    data = [n for n in names if n.startswith(DATA_KINDS)]
    return data[-1] if data else None


def _ids(build: Any, key: str, table: str = "rows") -> set[str]:
    from runner import api
    from stores.datastore import connect

    sql = api.table_sqls(build.cache, key).get(table)
    if sql is None:
        return set()
    con = connect()
    try:
        return {r[0] for r in con.execute(f"select id from {sql}").fetchall()}
    finally:
        con.close()


def _rejections(build: Any, plan: dict[str, Any], arts: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """id -> (step, reason, detail) over every data step's rejects."""
    from runner import api
    from stores.datastore import connect

    out: dict[str, tuple[str, str, str]] = {}
    con = connect()
    try:
        for n in plan:
            if n in arts and n.startswith(DATA_KINDS):
                sql = api.table_sqls(build.cache, arts[n].key).get("rejects")
                if sql:
                    for rid, reason, detail in con.execute(f"select id, reason, detail from {sql}").fetchall():
                        out.setdefault(rid, (n, reason, detail or ""))
    finally:
        con.close()
    return out


def _row_changes(
    a: Any, b: Any, plan_a: dict[str, Any], plan_b: dict[str, Any], arts_a: dict[str, Any], arts_b: dict[str, Any]
) -> dict[str, Any] | None:
    last_a, last_b = _last_data_step(list(plan_a)), _last_data_step(list(plan_b))
    if last_a is None or last_b is None or last_a not in arts_a or last_b not in arts_b:
        return None
    ids_a, ids_b = _ids(a, arts_a[last_a].key), _ids(b, arts_b[last_b].key)
    rej_a, rej_b = _rejections(a, plan_a, arts_a), _rejections(b, plan_b, arts_b)

    def change(i: str, rejects: dict[str, tuple[str, str, str]], side: str) -> dict[str, str]:
        step, reason, detail = rejects.get(i, ("?", "not_in_sources", f"not in {side}'s sources"))
        return {"id": i, "step": step, "reason": reason, "detail": detail}

    removed = [change(i, rej_b, "B") for i in sorted(ids_a - ids_b)]
    added = [change(i, rej_a, "A") for i in sorted(ids_b - ids_a)]
    return {
        "a_step": last_a,
        "b_step": last_b,
        "a_rows": len(ids_a),
        "b_rows": len(ids_b),
        "removed": removed,
        "added": added,
    }


def _generations(ea: Any, eb: Any, a: Any, b: Any) -> list[dict[str, Any]]:
    from runner import api
    from stores.datastore import connect

    if ea is None or eb is None:
        return []
    con = connect()
    try:
        ga = dict(
            con.execute(f"select prompt, output from {api.table_sqls(a.cache, ea.key)['generations']}").fetchall()
        )
        gb = dict(
            con.execute(f"select prompt, output from {api.table_sqls(b.cache, eb.key)['generations']}").fetchall()
        )
    finally:
        con.close()
    return [{"prompt": p, "a": ga.get(p), "b": gb.get(p)} for p in dict.fromkeys(list(ga) + list(gb))]


def markdown(d: dict[str, Any], limit: int = 50) -> str:
    """A pull-request comment."""
    out = [f"### runner diff: `{os.path.basename(d['a'])}` → `{os.path.basename(d['b'])}`", ""]
    if d["params"]:
        out += ["**Changed values**", "", "| key | A | B |", "|---|---|---|"]
        out += [f"| `{p['path']}` | `{p['a']}` | `{p['b']}` |" for p in d["params"]]
        out.append("")
    changed = [s for s in d["steps"] if s["changed"]]
    out += [f"**Steps**: {len(changed)} of {len(d['steps'])} change key", ""]
    if changed:
        out += ["| step | A | B |", "|---|---|---|"]
        out += [f"| {s['step']} | `{(s['a'] or '-')[:12]}` | `{(s['b'] or '-')[:12]}` |" for s in changed]
        out.append("")
    if d["rows"]:
        out += ["**Rows per step** (A → B)", "", "| step | A | B |", "|---|---|---|"]
        out += [f"| {r['step']} | {_rows(r['a'])} | {_rows(r['b'])} |" for r in d["rows"] if r["a"] != r["b"]]
        out.append("")
    rc = d["row_changes"]
    if rc:
        out += [
            f"**Rows**: {rc['a_rows']} → {rc['b_rows']} ({len(rc['removed'])} removed, {len(rc['added'])} added)",
            "",
        ]
        for kind in ("removed", "added"):
            for r in rc[kind][:limit]:
                out.append(
                    f"- {kind} `{r['id']}` by {r['step']}: {r['reason']}" + (f" ({r['detail']})" if r["detail"] else "")
                )
            if len(rc[kind]) > limit:
                out.append(f"- … {len(rc[kind]) - limit} more {kind}")
        out.append("")
    if d["metrics"]:
        out += ["**Metrics**", "", "| step | metric | A | B | B - A (95% interval) |", "|---|---|---|---|---|"]
        out += [
            f"| {m['step']} | {m['metric']} | {_num(m['a'])} | {_num(m['b'])} | {_change(m.get('change'))} |"
            for m in d["metrics"]
        ]
        out.append("")
    if d["scores"]:
        out += [*scores_table(d["scores"]), ""]
    if d["generations"]:
        out += ["**Generations**", "", "| prompt | A | B |", "|---|---|---|"]
        out += [f"| {g['prompt']} | {g['a']} | {g['b']} |" for g in d["generations"]]
    return "\n".join(out).rstrip() + "\n"


def scores_table(entries: list[dict[str, Any]]) -> list[str]:
    """Harness tasks and judges as the h2oGPT paper's table: a row per task and metric, the models side by side
    (value ± stderr), then the changes with their 95% intervals; a change whose interval holds 0 is marked noise."""
    out = [
        "**Scores** (value ± stderr; changes with their 95% interval, paired on the same examples where they are "
        "per-example means)",
        "",
        "| task | metric | n | base | A | B | A - base | B - A |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for e in entries:
        a, b = e.get("a", {}), e.get("b", {})
        base = a.get("base") or b.get("base")
        n = next((x["n"] for x in (a.get("tuned"), b.get("tuned"), base) if x), "-")
        out.append(
            f"| {e['task']} | {e['metric']} | {n} | {_score(base)} | {_score(a.get('tuned'))} | "
            f"{_score(b.get('tuned'))} | {_change(a.get('gain'))} | {_change(e.get('change'))} |"
        )
    return out


def _score(x: dict[str, Any] | None) -> str:
    if not x or x.get("value") is None:
        return "-"
    return f"{x['value']:.3f}" + (f" ± {x['stderr']:.3f}" if x.get("stderr") is not None else "")


def _change(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    text = f"{c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
    return text + (" noise" if c["within_noise"] else "")


def _rows(r: dict[str, int] | None) -> str:
    return "-" if not r else ", ".join(f"{k} {v}" for k, v in r.items())


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
