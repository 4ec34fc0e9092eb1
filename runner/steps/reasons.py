"""Why a row was dropped: a stable category (`reason`) from the list below, the specifics in `detail`.

Every rejects table has the columns id, source, step, reason, detail. `reason` is always one of
`REASONS`, so `group by reason` gives a handful of groups; `detail` says which record, field,
bound or row (`record 12`, `response has 3 chars, below min_chars 5`, `of s/4 (jaccard 0.91)`).
"""

from __future__ import annotations

REASONS: dict[str, str] = {
    # reading records (sources, documents)
    "unreadable": "the record could not be read: bad JSON or UTF-8, an empty line, not an object",
    "missing_field": "a field the source needs is missing, null or not text",
    "bad_value": "a field has a value of the wrong kind (a score that is not a number, an unknown role)",
    "empty_text": "a prompt, reply or document is empty (or only whitespace)",
    "no_reply": "the conversation has no assistant reply to learn",
    "duplicate_id": "the record's id was already used by an earlier record (detail names it)",
    "not_in_category": "a Dolly record outside the categories the source keeps",
    # OpenAssistant trees
    "duplicate_tree": "a tree or message repeated in the export (detail names the line of the first)",
    "malformed_message": "an oasst message without text or a prompter/assistant role",
    "orphan": "a flat oasst message whose parent is not in the file",
    "tree_state": "the message's tree is in a state the source does not keep",
    "deleted": "a deleted oasst message",
    "language": "the text is in a language the step does not keep",
    "not_reviewed": "an oasst message whose review_result is not true",
    "synthetic": "a model-written oasst message",
    "rank": "an oasst reply ranked worse than max_rank, or not the top-ranked one (mode: top)",
    "label": "an oasst label outside the source's bounds",
    "parent_dropped": "an oasst message below a dropped one (detail: why the parent went)",
    "unanswered": "an oasst prompt that no kept assistant reply answers",
    "not_a_prompt": "an oasst tree whose root is not a prompter message",
    # mixing and sampling
    "not_sampled": "left out of a seeded sample (source weight < 1, or a sample filter)",
    "beyond_limit": "after the first n rows a limit filter keeps",
    # filters
    "sql_predicate": "a sql filter's predicate is not true for the row",
    "too_short": "shorter than a length filter's minimum (chars, words or tokens)",
    "too_long": "longer than a length filter's maximum (chars, words or tokens)",
    "duplicate": "an exact duplicate of an earlier row (detail names it)",
    "near_duplicate": "a near-duplicate of an earlier row (detail names it and the Jaccard similarity)",
    "empty_after_clean": "a turn is empty once cleaned",
    "regex": "a regex filter matched (action drop) or did not match (action keep)",
    "profanity": "a profane word (detail names it)",
    "unhelpful": "a refusal or 'as an AI language model' phrase (detail names it)",
    "no_score": "a quality filter with missing: drop, and the row has no score",
    "score_out_of_range": "a quality score outside the filter's bounds",
    "repetitive": "zlib compression ratio below the filter's minimum",
    "compression": "zlib compression ratio above the filter's maximum",
    "off_topic": "prompt and response embeddings less similar than the filter's minimum",
    # formatting
    "bad_shape": "the conversation does not end with an assistant turn after a prompt",
    "template_failed": "the chat template could not render the conversation",
}


class Rejected(ValueError):
    """Raised while converting one record: it becomes a reject with this reason and detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise AssertionError(f"unknown reject reason {reason!r}; add it to REASONS")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def rejected(reason: str, detail_sql: str = "''") -> str:
    """SQL for a reject: a struct of its reason (one of REASONS) and `detail_sql`, an SQL expression."""
    if reason not in REASONS:
        raise AssertionError(f"unknown reject reason {reason!r}; add it to REASONS")
    return f"{{'reason': '{reason}', 'detail': {detail_sql}}}"


def markdown() -> str:
    """The reason list as a Markdown table (for the docs)."""
    return "| reason | meaning |\n|---|---|\n" + "\n".join(f"| `{k}` | {v} |" for k, v in REASONS.items())
