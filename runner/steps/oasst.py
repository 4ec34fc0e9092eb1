"""OpenAssistant message trees (oasst1/oasst2 exports) flattened into conversations.

Reads all three export layouts, line by line: tree records (`{message_tree_id, tree_state,
prompt: {..., replies: [...]}}`), nested root messages (`{message_id, ..., replies}`), and
flat messages (`{message_id, parent_id, ...}`, trees rebuilt from `parent_id`).

Accounting is per message: every message read is either used by at least one conversation
or rejected with its reason (deleted, language, review, synthetic, tree state, rank, label
bounds, a rejected parent, a prompt nobody answered, not the top-ranked reply).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext
from runner.steps.reasons import Rejected
from runner.steps.sources import SourceBase, _jsonl, source_kind, write_tables


class LabelBound(Params):
    min: float | None = None
    max: float | None = None


@source_kind("source.oasst")
class OasstSource(SourceBase):
    FILE_OR_DIR_FIELDS = frozenset()  # one export file (a tree's messages may be anywhere in it)

    """OpenAssistant exports in all three layouts (tree records, nested root messages, flat messages linked by
    `parent_id`). `mode: paths` emits every root-to-leaf conversation; `top` follows only the best-ranked
    assistant reply at each turn. Message filters (`lang`, `deleted`, `review_result`, `synthetic`, `tree_state`,
    `rank`, label bounds) prune a message and everything below it."""

    format: Literal["oasst"]
    mode: Literal["paths", "top"] = Field("paths", description="all root-to-leaf paths, or top-ranked replies only")
    lang: list[str] | None = Field(None, description="keep messages in these languages (default: any)")
    include_deleted: bool = False
    require_review: bool = Field(True, description="drop messages whose review_result is not true")
    include_synthetic: bool = Field(False, description="keep model-written (synthetic) messages")
    tree_states: list[str] | None = Field(
        ["ready_for_export"], description="keep trees in these states (null: any; trees with no state pass)"
    )
    max_rank: int | None = Field(None, ge=0, description="drop assistant replies ranked worse than this (0 = best)")
    labels: dict[str, LabelBound] = Field(
        default_factory=dict, description="label bounds, e.g. {quality: {min: 0.5}, toxicity: {max: 0.2}}"
    )
    score_label: str = Field("quality", description="label whose value becomes the row's score")

    def read(self, ctx: StepContext) -> None:
        read_oasst(ctx)


@dataclass
class Msg:
    id: str
    raw: dict[str, Any]
    tree_state: str | None
    children: list[Msg] = field(default_factory=list)
    reason: Rejected | None = None
    root: str = ""  # the id of its tree's root message: rows of one tree share it as their group

    @property
    def role(self) -> str:
        return "user" if self.raw.get("role") == "prompter" else "assistant"


def _label(raw: dict[str, Any], name: str) -> float | None:
    labels = raw.get("labels")
    if isinstance(labels, dict) and isinstance(labels.get(name), dict):
        value = labels[name].get("value")
        return float(value) if isinstance(value, (int, float)) else None
    return None


def _own_reason(m: Msg, p: OasstSource) -> Rejected | None:
    """Why this message alone is dropped, or None."""
    raw = m.raw
    if not isinstance(raw.get("text"), str) or raw.get("role") not in ("prompter", "assistant"):
        return Rejected("malformed_message", "needs text and role prompter|assistant")
    if p.tree_states is not None and m.tree_state is not None and m.tree_state not in p.tree_states:
        return Rejected("tree_state", f"tree_state {m.tree_state} not in {p.tree_states}")
    if raw.get("deleted") and not p.include_deleted:
        return Rejected("deleted")
    if p.lang is not None and raw.get("lang") not in p.lang:
        return Rejected("language", f"lang {raw.get('lang')} not in {p.lang}")
    if p.require_review and raw.get("review_result") is not True:
        return Rejected("not_reviewed", f"review_result {raw.get('review_result')}")
    if raw.get("synthetic") and not p.include_synthetic:
        return Rejected("synthetic", f"model_name {raw.get('model_name')}" if raw.get("model_name") else "")
    if not raw["text"].strip():
        return Rejected("empty_text", f"the {m.role} message is empty")
    rank = raw.get("rank")
    if p.max_rank is not None and m.role == "assistant" and isinstance(rank, int) and rank > p.max_rank:
        return Rejected("rank", f"rank {rank} > max_rank {p.max_rank}")
    for name, bound in p.labels.items():
        value = _label(raw, name)
        if value is None:
            continue
        if bound.min is not None and value < bound.min:
            return Rejected("label", f"label {name} {value:.3g} < {bound.min}")
        if bound.max is not None and value > bound.max:
            return Rejected("label", f"label {name} {value:.3g} > {bound.max}")
    return None


def _nested(raw: dict[str, Any], tree_state: str | None, out: list[Msg]) -> Msg:
    m = Msg(str(raw.get("message_id")), raw, tree_state or raw.get("tree_state"))
    out.append(m)
    replies = raw.get("replies") or []
    for child in replies if isinstance(replies, list) else []:
        if isinstance(child, dict):
            m.children.append(_nested(child, tree_state, out))
    return m


def read_trees(
    lines: Iterator[tuple[int, dict[str, Any] | None, Rejected | None]],
) -> tuple[list[Msg], list[Msg], list[tuple[int, Rejected]]]:
    """(roots, every message, bad lines). Flat messages are linked by parent_id after reading."""
    roots: list[Msg] = []
    every: list[Msg] = []
    bad: list[tuple[int, Rejected]] = []
    flat: list[Msg] = []
    first_line: dict[str, int] = {}  # message id -> line that brought it (exports do repeat trees)

    def add_root(root: Msg, n: int) -> None:
        if root.id in first_line:
            _mark(root, Rejected("duplicate_tree", f"line {n} repeats the tree on line {first_line[root.id]}"))
        else:
            first_line[root.id] = n
            roots.append(root)

    for n, rec, error in lines:
        if rec is None:
            bad.append((n, error or Rejected("unreadable", f"line {n}")))
        elif isinstance(rec.get("prompt"), dict):
            add_root(_nested(rec["prompt"], rec.get("tree_state"), every), n)
        elif "message_id" in rec and isinstance(rec.get("replies"), list):
            add_root(_nested(rec, None, every), n)
        elif "message_id" in rec:
            m = Msg(str(rec["message_id"]), rec, rec.get("tree_state"))
            every.append(m)
            if m.id in first_line:
                m.reason = Rejected("duplicate_tree", f"line {n} repeats the message on line {first_line[m.id]}")
            else:
                first_line[m.id] = n
                flat.append(m)
        else:
            bad.append((n, Rejected("unreadable", f"line {n}: neither a tree nor a message (no prompt or message_id)")))
    by_id = {m.id: m for m in flat}
    for m in flat:
        parent = m.raw.get("parent_id")
        if parent is None:
            roots.append(m)
        elif parent in by_id:
            by_id[parent].children.append(m)
        else:
            m.reason = Rejected("orphan", f"parent {parent} not in the file")
    for m in flat:
        if m.reason is not None:
            for c in m.children:
                _mark(c, _parent_dropped(m.reason))
    for root in roots:  # a flat tree's state lives on its messages; the root's is the tree's
        _inherit(root, root.tree_state, root.id)
    return roots, every, bad


def _parent_dropped(why: Rejected) -> Rejected:
    return why if why.reason == "parent_dropped" else Rejected("parent_dropped", str(why))


def _mark(m: Msg, reason: Rejected) -> None:
    m.reason = reason
    for c in m.children:
        _mark(c, reason)


def _inherit(m: Msg, state: str | None, root: str) -> None:
    m.tree_state, m.root = state, root
    for c in m.children:
        _inherit(c, state, root)


def _rank(m: Msg) -> int:
    """A reply's rank among its siblings (0 best); unranked replies after every ranked one."""
    rank = m.raw.get("rank")
    return rank if isinstance(rank, int) else 1 << 30


def _prune(m: Msg, p: OasstSource, parent_reason: Rejected | None) -> None:
    """Set `reason` on every dropped message (a dropped message takes its subtree with it)."""
    m.reason = m.reason or (_parent_dropped(parent_reason) if parent_reason else _own_reason(m, p))
    if p.mode == "top" and m.role == "user" and m.reason is None:
        live = [c for c in m.children if c.role == "assistant" and _own_reason(c, p) is None]
        if live:
            best = min(live, key=_rank)
            for c in live:
                if c is not best:
                    c.reason = Rejected("rank", f"not the top-ranked reply (rank {c.raw.get('rank')})")
    for c in m.children:
        _prune(c, p, parent_reason or m.reason)


def _paths(m: Msg, prefix: list[Msg]) -> Iterator[list[Msg]]:
    if m.reason is not None:
        return
    path = [*prefix, m]
    live = [c for c in m.children if c.reason is None]
    if not live:
        yield path
    for c in live:
        yield from _paths(c, path)


def conversations(roots: list[Msg], p: OasstSource) -> Iterator[list[Msg]]:
    """Root-to-leaf paths cut after their last assistant message, each once; a root must be a prompt."""
    for root in roots:
        if root.reason is None and root.role != "user":
            root.reason = Rejected("not_a_prompt", f"the root is an {root.raw.get('role')} message")
        _prune(root, p, None)
        seen: set[str] = set()
        for path in _paths(root, []):
            while path and path[-1].role != "assistant":
                path = path[:-1]
            if path and path[-1].id not in seen:
                seen.add(path[-1].id)
                yield path


def read_oasst(ctx: StepContext) -> None:
    import itertools

    p: OasstSource = ctx.params
    lines = _jsonl(ctx.files[p.path])
    if p.limit:
        lines = itertools.islice(lines, p.limit)
    roots, every, bad = read_trees(lines)
    rows = []
    used: set[int] = set()
    for path in conversations(roots, p):
        used.update(id(m) for m in path)
        leaf = path[-1]
        rows.append(
            {
                "id": f"{p.name}/{leaf.id}",
                "source": p.name,
                "turns": [{"role": m.role, "text": m.raw["text"]} for m in path],
                "score": _label(leaf.raw, p.score_label),
                "lang": path[0].raw.get("lang"),
                "group_id": f"{p.name}/{path[0].root or path[0].id}",
                "tools": None,
            }
        )
    rejects = [
        {"id": f"{p.name}/line-{n}", "source": p.name, "step": ctx.name, "reason": why.reason, "detail": why.detail}
        for n, why in bad
    ]
    for m in every:
        if id(m) not in used:
            why = m.reason or (
                Rejected("unanswered", "no kept assistant reply follows this prompt")
                if m.role == "user"
                else Rejected("parent_dropped", "no kept conversation reaches it")
            )
            rejects.append(
                {
                    "id": f"{p.name}/{m.id}",
                    "source": p.name,
                    "step": ctx.name,
                    "reason": why.reason,
                    "detail": why.detail,
                }
            )
    write_tables(ctx, rows, rejects, len(every) + len(bad), used=len(used), unit="messages")
