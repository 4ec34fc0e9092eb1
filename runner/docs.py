"""Reference docs generated from code, so they cannot drift: the recipe keys and the CLI help."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + (
            " (optional)" if type(None) in args else ""
        )
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(defaults)"
    return f"`{value!r}`" if value not in (None, [], {}) else ("—" if value is None else f"`{value!r}`")


def model_section(model: type[BaseModel], path: str) -> str:
    title = f"`{path}`" if path else "The recipe (top level)"
    tag = _tag(model)
    lines = [
        f'<a id="{model.__name__.lower()}"></a>',
        "",
        f"### {title}{tag} · {model.__name__}",
        "",
        inspect.cleandoc(model.__doc__ or ""),
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |")
    return "\n".join(lines)


def _tag(model: type[BaseModel]) -> str:
    """` (kind: length)` for a member of a union told apart by a literal field."""
    for name in ("kind", "format"):
        field = model.model_fields.get(name)
        if field is not None and typing.get_origin(field.annotation) is typing.Literal:
            return f" ({name}: {' / '.join(map(str, typing.get_args(field.annotation)))})"
    return ""


def _walk(model: type[BaseModel], path: str, seen: set[type[BaseModel]], out: list[str]) -> None:
    """Sections in key-path order: a model, then the models under each of its keys (a model used at
    two key paths is described at the first)."""
    from runner.schema import models_in

    if model in seen:
        return
    seen.add(model)
    out.append(model_section(model, path))
    for name, field in model.model_fields.items():
        plural = typing.get_origin(_unwrap(field.annotation)) is list
        key = f"{path}.{name}" if path else name
        for sub in models_in(field.annotation):
            _walk(sub, key + ("[]" if plural else ""), seen, out)


def _unwrap(annotation: Any) -> Any:
    """Without Optional and Annotated."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
            annotation = next(a for a in args if a is not type(None))
        else:
            return annotation


def recipe_reference() -> str:
    from runner.schema import Recipe

    intro = (
        "Every section below is a typed model, in the order of its key path in a recipe (`data.sources[]` is "
        "an entry of the list `data.sources`): unknown keys are errors, and `runner validate` checks a recipe "
        "without running it. Top-level `extends: base.yaml` (or a list) merges the recipe over its bases "
        "(mappings merge, other values replace); `${a.b}` is replaced by the value at key path `a.b`; "
        "`--set a.b=c` overrides any value on every command."
    )
    sections: list[str] = []
    _walk(Recipe, "", set(), sections)
    return "\n\n".join([intro, *sections])


def cli_reference(parser: Any) -> str:
    """The help of `parser` (the CLI's, passed in: the CLI's own `reference` command calls this) and of every
    subcommand."""
    import argparse
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # help text wraps the same everywhere
    try:
        return _cli_reference(parser, argparse)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _cli_reference(parser: Any, argparse: Any) -> str:
    out = ["```", parser.format_help().strip(), "```"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += ["", f"### runner {name}", "", "```", sub.format_help().strip(), "```"]
    return "\n".join(out)


def reject_reasons() -> str:
    from runner.steps.reasons import markdown

    return markdown()


def _summary(model: type[BaseModel]) -> str:
    """A kind's docstring's first paragraph, on one line: what the tables of kinds say of it."""
    return " ".join(inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].split()).replace("|", "\\|")


def _kinds(family: str, tag: str) -> list[tuple[list[str], str]]:
    """The names (values of `tag`) and summary of every registered kind of a family, by first name."""
    import runner.steps  # noqa: F401  (registers every kind)
    from runner import registry

    return sorted(
        (list(registry.literal_values(model, tag)), _summary(model)) for model in registry.entry_models(family)
    )


def _table(family: str, tag: str, what: str) -> str:
    rows = [f"| {', '.join(f'`{n}`' for n in names)} | {summary} |" for names, summary in _kinds(family, tag)]
    return "\n".join([f"| {tag} | {what} |", "|---|---|", *rows])


def source_formats() -> str:
    return _table("source", "format", "rows from")


def filter_kinds() -> str:
    return _table("filter", "kind", "what it does")


def kinds_in_short() -> str:
    """Two lines for README: every source format and every filter kind."""
    sources = ", ".join(f"`{n}`" for names, _ in _kinds("source", "format") for n in names)
    filters = ", ".join(f"`{n}`" for names, _ in _kinds("filter", "kind") for n in names)
    return f"Sources (`format:`): {sources}.\nFilters (`kind:`), each a cached step: {filters}."


def engine_parameters() -> str:
    """Which serving engine honours which optional request parameter (the others refuse it by name)."""
    from runner.serve.engine import OPTIONAL
    from runner.serve.load import SUPPORTS

    head = "| parameter | " + " | ".join(f"`{e}`" for e in SUPPORTS) + " |"
    rule = "|---|" + "---|" * len(SUPPORTS)
    rows = [
        f"| `{p}` | " + " | ".join("yes" if p in s else "refused" for s in SUPPORTS.values()) + " |" for p in OPTIONAL
    ]
    return "\n".join([head, rule, *rows])


SECTIONS: dict[str, Any] = {
    "recipe-reference": recipe_reference,
    "cli-reference": cli_reference,
    "reject-reasons": reject_reasons,
    "source-formats": source_formats,
    "filter-kinds": filter_kinds,
    "kinds-in-short": kinds_in_short,
    "engine-parameters": engine_parameters,
}


def update_markers(text: str, parser: Any) -> str:
    """Replace what stands between `<!-- NAME:start -->` and `<!-- NAME:end -->` by the generated text,
    for every section whose markers the text has (`parser`: the CLI's, for its reference)."""
    sections = {**SECTIONS, "cli-reference": lambda: cli_reference(parser)}
    for name, make in sections.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{make()}\n{end}{tail}"
    return text


def markers(text: str) -> set[str]:
    """The generated sections a document holds."""
    return {name for name in SECTIONS if f"<!-- {name}:start -->" in text and f"<!-- {name}:end -->" in text}
