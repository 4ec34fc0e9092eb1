"""runner report: one self-contained HTML file about a build, or about the difference between two.

A build's report: the step graph (state, key, build time), rows in, out and rejected per data step with the top
reasons and example rows, the training loss and validation curves, the evaluation metrics with their 95%
intervals, and the generations. Two recipes' report: what `runner diff` finds (changed values and steps, row
counts, rows that changed sides and the step that decided, metric changes with intervals, generations side by
side), with both training curves overlaid.

`collect` and `collect_diff` gather plain data from the cache; `render` turns it into HTML. Charts are plotly's,
its script embedded once: the file needs no network, and its Content-Security-Policy forbids any. Every text
from the data (rows, generations, reasons, paths) is escaped: shown as text, never markup."""

from __future__ import annotations

import datetime
import html
import json
from typing import Any

from runner.diff import DATA_KINDS

EXAMPLES = 3  # example rejected rows shown per reason
Z95 = 1.959963984540054


def collect(build: Any) -> dict[str, Any]:
    """A build's report data: steps, data, training, evaluation (from what the cache holds for its plan)."""
    from runner import api

    plans = api.plan(build)
    arts = {p.name: art for p in plans if p.state == "cached" and p.key and (art := build.cache.get(p.key))}
    steps = []
    for p in plans:
        art = arts.get(p.name)
        timings = art.manifest.get("timings", {}) if art else {}
        steps.append(
            {
                "step": p.name,
                "kind": p.kind,
                "state": "built" if art else p.state,  # built: in the cache; run / pending: not yet
                "key": p.key,
                "seconds": timings.get("seconds"),
                "built_at": timings.get("started"),
                "peak_rss": (art.manifest.get("memory") or {}).get("peak_rss_bytes") if art else None,
                "why": list(p.why) if not art else [],
            }
        )
    return {
        "recipe": str(build.loaded.path),
        "name": build.loaded.name,
        "steps": steps,
        "data": [_data_step(build, n, arts[n]) for n in arts if n.startswith(DATA_KINDS) or n in ("format", "split")],
        "training": _training(arts.get("train")),
        "metrics": _metrics(arts),
        "generations": _table_rows(build, arts.get("eval"), "generations", ("prompt", "output")),
    }


def collect_diff(a: Any, b: Any) -> dict[str, Any]:
    """Two builds' report data: `runner diff`'s comparison and each side's training curves."""
    from runner.diff import compare

    def curves(build: Any) -> dict[str, Any] | None:
        from runner import api

        return _training(api.artifact(build, "train")) if "train" in build.graph.nodes else None

    return {"diff": compare(a, b), "a_name": a.loaded.name, "b_name": b.loaded.name, "a": curves(a), "b": curves(b)}


def _data_step(build: Any, name: str, art: Any) -> dict[str, Any]:
    """Rows in, out and rejected; the top reasons, each with example rows (their text from the step's input)."""
    from runner import api
    from stores.datastore import connect

    counts = dict(art.manifest.get("rows", {}))
    rejected = int(counts.get("rejects", 0))
    step: dict[str, Any] = {
        "step": name,
        "in": counts.get("in"),
        "out": _out(counts),
        "rejected": rejected,
        "reasons": [],
    }
    tables = api.table_sqls(build.cache, art.key)
    if not rejected or "rejects" not in tables:
        return step
    inputs = art.manifest.get("lineage", {}).get("input_keys", [])
    source = api.table_sqls(build.cache, inputs[0]).get("rows") if inputs else None
    con = connect()
    try:
        reasons = con.execute(
            f"select reason, count(*) n from {tables['rejects']} group by reason order by n desc, reason limit 5"
        ).fetchall()
        for reason, n in reasons:
            text = "''"
            if source is not None:
                text = (
                    "(select list_transform(r.turns[1:2], lambda t: t.role || ': ' || t.text) from "
                    f"{source} r where r.id = x.id)"
                )
            rows = con.execute(
                f"select x.id, x.detail, {text} from {tables['rejects']} x where x.reason = ? order by x.id limit ?",
                [reason, EXAMPLES],
            ).fetchall()
            examples = [
                {"id": i, "detail": d or "", "text": "\n".join(t) if isinstance(t, list) else ""} for i, d, t in rows
            ]
            step["reasons"].append({"reason": reason, "rows": n, "examples": examples})
    finally:
        con.close()
    return step


def _out(counts: dict[str, int]) -> int:
    """The rows a data step passes on: its `rows`, or a split's train + validation."""
    return counts["rows"] if "rows" in counts else sum(v for k, v in counts.items() if k not in ("in", "rejects"))


def _training(art: Any) -> dict[str, Any] | None:
    if art is None or "train_result.json" not in art.manifest.get("files", {}):
        return None
    result = json.loads(art.file("train_result.json").read_text())
    return {"steps": result["steps"], "losses": result["losses"], "validation": result.get("validation", {})}


def _metrics(arts: dict[str, Any]) -> list[dict[str, Any]]:
    """Each evaluation metric with its stderr and 95% interval (when the step has one), base beside tuned."""
    out = []
    for name, art in arts.items():
        if art.manifest.get("kind") not in ("eval", "harness", "judge"):
            continue
        m = art.manifest.get("metrics", {})
        for k, v in sorted(m.items()):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or k.endswith(("_stderr", "_seconds")):
                continue
            se = m.get(f"{k}_stderr")
            row = {"step": name, "metric": k, "value": v, "stderr": se}
            if isinstance(se, (int, float)):
                row["low"], row["high"] = v - Z95 * se, v + Z95 * se
            out.append(row)
    return out


def _table_rows(build: Any, art: Any, table: str, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    from runner import api
    from stores.datastore import connect

    if art is None or table not in (tables := api.table_sqls(build.cache, art.key)):
        return []
    con = connect()
    try:
        rows = con.execute(f"select {', '.join(columns)} from {tables[table]}").fetchall()
    finally:
        con.close()
    return [dict(zip(columns, r, strict=True)) for r in rows]


# -- HTML ----------------------------------------------------------------------------------------------------

CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1f2328;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;width:100%}td,th{border:1px solid #d0d7de;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.built{color:#1a7f37}.run,.pending{color:#9a6700}.dim{color:#656d76}pre{white-space:pre-wrap;margin:0;
font:12px ui-monospace,monospace}.up{color:#1a7f37}.down{color:#cf222e}
"""


def render(data: dict[str, Any]) -> str:
    """A build's report as one HTML page."""
    title = f"runner report: {data['name']}"
    parts = [f"<h1>{_e(title)}</h1>", f"<p class=dim>{_e(data['recipe'])}</p>"]
    parts += ["<h2>Steps</h2>", _steps_table(data["steps"]), _chart("chart-steps", _steps_figure(data["steps"]))]
    if data["data"]:
        parts += ["<h2>Data</h2>", _chart("chart-rows", _rows_figure(data["data"])), _reasons(data["data"])]
    if data["training"]:
        parts += ["<h2>Training</h2>", _chart("chart-loss", _loss_figure({"": data["training"]}))]
    if data["metrics"]:
        parts += ["<h2>Evaluation</h2>", _metrics_table(data["metrics"])]
        if figure := _metrics_figure(data["metrics"]):
            parts.append(_chart("chart-metrics", figure))
    if data["generations"]:
        parts += [
            "<h2>Generations</h2>",
            _table(["prompt", "output"], [[g["prompt"], g["output"]] for g in data["generations"]]),
        ]
    return _page(title, parts)


def render_diff(data: dict[str, Any]) -> str:
    """Two recipes' report as one HTML page."""
    d, a, b = data["diff"], data["a_name"], data["b_name"]
    title = f"runner report: {a} → {b}"
    parts = [f"<h1>{_e(title)}</h1>", f"<p class=dim>A: {_e(d['a'])}<br>B: {_e(d['b'])}</p>"]
    if d["params"]:
        parts += [
            "<h2>Changed values</h2>",
            _table(["key", "A", "B"], [[p["path"], _j(p["a"]), _j(p["b"])] for p in d["params"]]),
        ]
    changed = [s for s in d["steps"] if s["changed"]]
    parts += [
        f"<h2>Steps</h2><p>{len(changed)} of {len(d['steps'])} steps change key.</p>",
        _table(["step", "A", "B"], [[s["step"], (s["a"] or "-")[:12], (s["b"] or "-")[:12]] for s in changed]),
    ]
    if d["rows"]:
        parts += ["<h2>Data</h2>", _chart("chart-rows", _rows_diff_figure(d["rows"], a, b))]
    if rc := d["row_changes"]:
        parts.append(f"<p>Rows at the end of the data steps: A {rc['a_rows']}, B {rc['b_rows']}.</p>")
        for side, what in (("removed", "in A, not in B"), ("added", "in B, not in A")):
            if rc[side]:
                parts.append(f"<h3>{len(rc[side])} rows {what}; the step that decided</h3>")
                rows = [[c["id"], c["step"], c["reason"], c["detail"]] for c in rc[side][:50]]
                parts.append(_table(["id", "step", "reason", "detail"], rows))
    curves = {name: t for name, t in ((f"A: {a}", data["a"]), (f"B: {b}", data["b"])) if t}
    if curves:
        parts += ["<h2>Training</h2>", _chart("chart-loss", _loss_figure(curves))]
    if d["metrics"] or d["scores"]:
        parts.append("<h2>Evaluation</h2>")
        rows = [
            [m["step"], m["metric"], _n(m["a"]), _n(m["b"]), _delta(m.get("change"), m["a"], m["b"])]
            for m in d["metrics"]
        ]
        rows += [
            [s["task"], s["metric"], _n(_tuned(s, "a")), _n(_tuned(s, "b")), _delta(s.get("change"), None, None)]
            for s in d["scores"]
        ]
        parts.append(_table(["step", "metric", "A", "B", "B - A (95% interval)"], rows, raw={4}))
    if d["generations"]:
        rows = [[g["prompt"], g["a"] or "", g["b"] or ""] for g in d["generations"]]
        parts += ["<h2>Generations</h2>", _table(["prompt", "A", "B"], rows)]
    return _page(title, parts)


def _page(title: str, parts: list[str]) -> str:
    from plotly.offline import get_plotlyjs

    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(parts)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{_e(title)}</title><style>{STYLE}</style><script>{get_plotlyjs()}</script></head>"
        f"<body>{body}<p class=dim>made by runner report, {generated}</p></body></html>\n"
    )


def _chart(div_id: str, figure: Any) -> str:
    return str(figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False}))


def _steps_figure(steps: list[dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    built = [s for s in steps if s["seconds"] is not None]
    fig = go.Figure(
        go.Bar(x=[s["seconds"] for s in built], y=[s["step"] for s in built], orientation="h", name="seconds")
    )
    fig.update_layout(
        title="Build time per step (seconds)", yaxis={"autorange": "reversed"}, height=120 + 22 * len(built)
    )
    return fig


def _rows_figure(data: list[dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    names = [d["step"] for d in data]
    fig = go.Figure(
        [
            go.Bar(name="in", x=names, y=[d["in"] for d in data]),
            go.Bar(name="out", x=names, y=[d["out"] for d in data]),
            go.Bar(name="rejected", x=names, y=[d["rejected"] for d in data]),
        ]
    )
    fig.update_layout(title="Rows in, out and rejected per data step", barmode="group", height=380)
    return fig


def _rows_diff_figure(rows: list[dict[str, Any]], a: str, b: str) -> Any:
    import plotly.graph_objects as go

    def total(r: dict[str, int] | None) -> int | None:
        return (
            None
            if r is None
            else (r["rows"] if "rows" in r else sum(v for k, v in r.items() if k not in ("in", "rejects")))
        )

    names = [r["step"] for r in rows]
    fig = go.Figure(
        [
            go.Bar(name=f"A: {a}", x=names, y=[total(r["a"]) for r in rows]),
            go.Bar(name=f"B: {b}", x=names, y=[total(r["b"]) for r in rows]),
        ]
    )
    fig.update_layout(title="Rows out per step", barmode="group", height=380)
    return fig


def _loss_figure(curves: dict[str, dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, t in curves.items():
        label = f"{name} " if name else ""
        fig.add_trace(go.Scatter(x=t["steps"], y=t["losses"], mode="lines", name=f"{label}training loss"))
        if t["validation"].get("steps"):
            v = t["validation"]
            fig.add_trace(go.Scatter(x=v["steps"], y=v["losses"], mode="lines+markers", name=f"{label}validation loss"))
    fig.update_layout(title="Loss by step", xaxis_title="step", yaxis_title="loss", height=380)
    return fig


def _metrics_figure(metrics: list[dict[str, Any]]) -> Any:
    """Every metric that has a 95% interval, as a point with its interval."""
    import plotly.graph_objects as go

    shown = [m for m in metrics if "low" in m]
    if not shown:
        return None
    labels = [f"{m['step']}: {m['metric']}" for m in shown]
    fig = go.Figure(
        go.Scatter(
            x=[m["value"] for m in shown],
            y=labels,
            mode="markers",
            error_x={"type": "data", "array": [m["high"] - m["value"] for m in shown]},
        )
    )
    fig.update_layout(title="Metrics with 95% intervals", yaxis={"autorange": "reversed"}, height=140 + 28 * len(shown))
    return fig


def _steps_table(steps: list[dict[str, Any]]) -> str:
    rows = []
    for s in steps:
        when = (
            datetime.datetime.fromtimestamp(s["built_at"], datetime.UTC).strftime("%Y-%m-%d %H:%M")
            if s["built_at"]
            else ""
        )
        state = f"<span class={s['state']}>{_e(s['state'])}</span>"
        took = f"{s['seconds']:.2f}" if s["seconds"] is not None else ""
        peak = f"{s['peak_rss'] / 2**20:,.0f}" if s.get("peak_rss") else ""
        rows.append([s["step"], s["kind"], state, (s["key"] or "-")[:12], took, peak, when, "; ".join(s["why"])])
    header = ["step", "kind", "state", "key", "seconds", "peak MiB", "built (UTC)", "why it would run"]
    return _table(header, rows, raw={2})


def _reasons(data: list[dict[str, Any]]) -> str:
    out = []
    for d in data:
        for r in d["reasons"]:
            out.append(f"<h3>{_e(d['step'])}: {r['rows']} rows rejected as <code>{_e(r['reason'])}</code></h3>")
            out.append(_table(["id", "detail", "row"], [[x["id"], x["detail"], x["text"]] for x in r["examples"]]))
    return "\n".join(out)


def _metrics_table(metrics: list[dict[str, Any]]) -> str:
    rows = []
    for m in metrics:
        interval = f"{m['low']:.4g} to {m['high']:.4g}" if "low" in m else ""
        rows.append([m["step"], m["metric"], _n(m["value"]), _n(m["stderr"]), interval])
    return _table(["step", "metric", "value", "stderr", "95% interval"], rows)


def _delta(change: dict[str, Any] | None, a: Any, b: Any) -> str:
    if change:
        low, high, diff = change.get("low"), change.get("high"), change.get("delta")
        cls = "up" if low is not None and low > 0 else "down" if high is not None and high < 0 else ""
        return f"<span class='{cls}'>{_n(diff)} ({_n(low)} to {_n(high)})</span>"
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return _e(_n(b - a))
    return ""


def _tuned(score: dict[str, Any], side: str) -> Any:
    return score.get(side, {}).get("tuned", {}).get("value")


def _table(header: list[str], rows: list[list[Any]], raw: set[int] | None = None) -> str:
    """A table of text cells (escaped; `raw` columns are this module's own markup)."""
    raw = raw or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw else _cell(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return f"<pre>{_e(text)}</pre>" if "\n" in text else _e(text)


def _e(text: Any) -> str:
    return html.escape(str(text))


def _n(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _j(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v
