"""Recipe loading: YAML with line numbers, `extends:`, `--set` overrides, `${a.b}` interpolation,
then validation into the typed `Recipe` model. Every problem becomes a `RecipeError` naming
file, line and key path; all validation problems are reported together.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from runner.errors import Problem, RecipeError, Where
from runner.schema import Recipe, all_field_names

KeyPath = tuple[str | int, ...]
_REF = re.compile(r"\$\{([^}]*)\}")

# bounds that keep a hostile or broken recipe from taking unbounded time or memory
MAX_RECIPE_BYTES = 1_000_000  # a recipe names its data; it does not hold it
MAX_VALUES = 100_000  # values after YAML aliases are expanded ("billion laughs")
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_TEXT = 1_000_000  # characters of one string after ${...} interpolation


def show_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    raw: dict[str, Any]  # the recipe as parsed (extends, overrides and ${} applied), before validation
    positions: dict[KeyPath, Where]
    # hub revisions: the lock's pins to resolve from (`apply --locked`), and what compiling resolved (for the lock)
    pins: dict[str, str] = field(default_factory=dict)
    resolved: dict[str, str] = field(default_factory=dict)

    def where(self, path: KeyPath) -> Where:
        """The closest recorded position for `path` (the value itself, else its nearest parent)."""
        for i in range(len(path), -1, -1):
            if path[:i] in self.positions:
                return self.positions[path[:i]]
        return Where(str(self.path))

    def base_dir(self, path: KeyPath) -> Path:
        """The directory a relative path at `path` is relative to: that of the file that wrote it."""
        where = self.where(path)
        if where.line is None:  # a --set value: relative to where the command runs
            return Path.cwd()
        return Path(where.file).resolve().parent

    @property
    def name(self) -> str:
        return self.recipe.name or self.path.stem


# -- YAML with positions ---------------------------------------------------


def _fail(where: Where, path: KeyPath, message: str) -> RecipeError:
    return RecipeError([Problem(where, show_path(path), message)])


def _read_yaml(file: Path, shown: str) -> tuple[Any, dict[KeyPath, Where]]:
    try:
        size = file.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise _fail(
                Where(shown, 1),
                (),
                f"the recipe is {size:,} bytes; a recipe over {MAX_RECIPE_BYTES:,} bytes "
                "is not accepted (put data in the files it names)",
            )
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(Where(shown), "", "recipe file not found")], "Check the path.") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise _fail(Where(shown, line), (), f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _fail(Where(shown), (), f"cannot read ({exc.strerror})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except RecursionError:
        raise _fail(Where(shown, 1), (), f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = Where(shown, mark.line + 1 if mark else None)
        raise _fail(where, (), f"invalid YAML: {what}") from None
    finally:
        loader.dispose()
    if node is None:
        raise _fail(Where(shown, 1), (), "the recipe is empty; expected a mapping with at least `data:`")
    positions: dict[KeyPath, Where] = {}
    count = [0]
    open_nodes: set[int] = set()  # nodes being converted: an alias to one of them is a cycle

    def convert(n: yaml.Node, path: KeyPath) -> Any:
        here = Where(shown, n.start_mark.line + 1)
        positions[path] = here
        count[0] += 1
        if count[0] > MAX_VALUES:
            raise _fail(
                here,
                path,
                f"the recipe expands to more than {MAX_VALUES:,} values (YAML aliases repeating "
                "aliases?); a recipe is not that big",
            )
        if len(path) > MAX_DEPTH:
            raise _fail(here, path, f"nested too deeply (more than {MAX_DEPTH} levels)")
        if id(n) in open_nodes:
            raise _fail(here, path, "a YAML alias refers to a value that contains it (an endless recursion)")
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            open_nodes.add(id(n))
            try:
                return _collection(n, path)
            finally:
                open_nodes.discard(id(n))
        try:
            return loader.construct_object(n)
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer of thousands of digits
            raise _fail(here, path, f"invalid value: {str(exc).splitlines()[0][:200]}") from None

    def _collection(n: yaml.Node, path: KeyPath) -> Any:
        if isinstance(n, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k, v in n.value:
                where = Where(shown, k.start_mark.line + 1)
                try:
                    key = loader.construct_object(k) if isinstance(k, yaml.ScalarNode) else None
                except (yaml.YAMLError, ValueError):
                    key = None
                if not isinstance(key, str):
                    raise _fail(where, path, f"keys must be plain strings, got {k.value!r}")
                if key in out:
                    raise _fail(where, (*path, key), "duplicate key (YAML keeps only one; remove the other)")
                out[key] = convert(v, (*path, key))
                positions[(*path, key)] = where
            return out
        return [convert(v, (*path, i)) for i, v in enumerate(n.value)]

    data = convert(node, ())
    if not isinstance(data, dict):
        raise _fail(Where(shown, 1), (), f"the top level must be a mapping of sections, got {type(data).__name__}")
    return data, positions


# -- extends, --set, ${...} --------------------------------------------------


def _merge(base: Any, child: Any) -> Any:
    if isinstance(base, dict) and isinstance(child, dict):
        out = dict(base)
        for k, v in child.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return child


def _load_tree(file: Path, stack: tuple[Path, ...]) -> tuple[dict[str, Any], dict[KeyPath, Where]]:
    shown = _display(file)
    data, positions = _read_yaml(file, shown)
    parents = data.pop("extends", None)
    if parents is None:
        return data, positions
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise _fail(positions[("extends",)], ("extends",), "expected a recipe path or a list of recipe paths")
    where = positions.pop(("extends",))
    positions = {p: w for p, w in positions.items() if p[:1] != ("extends",)}
    merged: dict[str, Any] = {}
    merged_pos: dict[KeyPath, Where] = {}
    for parent in parents:
        target = (file.parent / parent).resolve()
        if target in stack:
            chain = " -> ".join(_display(p) for p in (*stack, target))
            raise _fail(where, ("extends",), f"recipes extend each other in a cycle: {chain}")
        if not target.is_file():
            raise _fail(where, ("extends",), f"base recipe {parent!r} not found (looked in {target.parent})")
        base, base_pos = _load_tree(target, (*stack, target))
        merged = _merge(merged, base)
        merged_pos.update(base_pos)
    # a child's non-mapping value replaces the base's wholesale: drop the base's positions below it
    replaced = {p for p in positions if p and not isinstance(_at(data, p), dict)}
    merged_pos = {p: w for p, w in merged_pos.items() if not any(p[:i] in replaced for i in range(1, len(p)))}
    merged_pos.update(positions)
    return _merge(merged, data), merged_pos


def _at(data: Any, path: KeyPath) -> Any:
    for part in path:
        data = data[part]
    return data


def _display(file: Path) -> str:
    try:
        return str(file.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(file)


def apply_set(data: dict[str, Any], positions: dict[KeyPath, Where], override: str) -> None:
    where = Where(f"--set {override}")
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise _fail(where, (), "expected KEY.PATH=VALUE, e.g. --set train.epochs=2")
    parts: list[str | int] = []
    for segment in key.strip().split("."):
        if not segment:
            raise _fail(where, (), f"empty segment in key path {key!r}")
        parts.append(int(segment) if segment.isdigit() and len(segment) < 10 else segment)
    if len(raw) > MAX_TEXT:
        raise _fail(where, tuple(parts), f"value is longer than {MAX_TEXT:,} characters")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise _fail(where, tuple(parts), f"value is not valid YAML ({str(exc).splitlines()[0][:200]})") from None
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = tuple(parts[: i + 1])
        if isinstance(node, list):
            if not isinstance(part, int) or part > len(node):
                raise _fail(where, here, f"is a list of {len(node)} items; use an index 0..{len(node)}")
            if part == len(node):
                node.append({} if not last else None)
        elif isinstance(node, dict):
            field = str(part)
            if not last and node.get(field) is None:
                node[field] = {}
            elif not last and not isinstance(node[field], (dict, list)):
                raise _fail(where, here, f"cannot set inside {type(node[field]).__name__} value {node[field]!r}")
            part = field
        else:
            raise _fail(where, here, f"cannot set inside {type(node).__name__} value {node!r}")
        if last:
            node[part] = value
        else:
            node = node[part]
    positions[tuple(parts)] = where
    for p in list(positions):
        if p[: len(parts)] == tuple(parts) and p != tuple(parts):
            positions[p] = where


def interpolate(data: dict[str, Any], positions: dict[KeyPath, Where]) -> dict[str, Any]:
    """Replace `${a.b}` by the value at key path a.b. A whole-string reference keeps the value's type.
    Each path is resolved once (references that double text cost linear time), and no string may grow
    past MAX_TEXT characters."""
    resolving: list[KeyPath] = []
    done: dict[KeyPath, Any] = {}

    def lookup(ref: str, at: KeyPath) -> Any:
        node: Any = data
        target: list[str | int] = []
        for part in ref.strip().split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                target.append(int(part))
            elif isinstance(node, dict) and part in node:
                target.append(part)
            else:
                raise _fail(positions.get(at, Where("recipe")), at, f"${{{ref}}} refers to a key that does not exist")
            node = node[target[-1]]
        tpath = tuple(target)
        if tpath in resolving:
            chain = " -> ".join(show_path(p) for p in (*resolving, tpath))
            raise _fail(positions.get(at, Where("recipe")), at, f"interpolation cycle: {chain}")
        if tpath in done:
            return done[tpath]
        resolving.append(tpath)
        try:
            done[tpath] = walk(node, tpath)
            return done[tpath]
        finally:
            resolving.pop()

    def walk(node: Any, path: KeyPath) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            whole = _REF.fullmatch(node)
            if whole:
                return lookup(whole.group(1), path)

            def text(m: re.Match[str]) -> str:
                value = lookup(m.group(1), path)
                if isinstance(value, (dict, list)):
                    raise _fail(
                        positions.get(path, Where("recipe")),
                        path,
                        f"${{{m.group(1)}}} is a {type(value).__name__}; only scalars can be embedded in text",
                    )
                return str(value)

            out = _REF.sub(text, node)
            if len(out) > MAX_TEXT:
                raise _fail(
                    positions.get(path, Where("recipe")),
                    path,
                    f"interpolation makes a string of {len(out):,} characters (more than {MAX_TEXT:,})",
                )
            return out
        return node

    result = walk(data, ())
    assert isinstance(result, dict)
    return result


# -- validation --------------------------------------------------------------

_EXPECT = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def _locate(data: Any, loc: tuple[Any, ...]) -> KeyPath:
    """Map a pydantic error location to a key path in the data (dropping union tags and the like)."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif i == len(loc) - 1 and isinstance(part, str) and not part.startswith(("function-", "tagged-union")):
            out.append(part)
    return tuple(out)


def _message(err: Any, path: KeyPath) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        name = str(path[-1]) if path else "?"
        close = difflib.get_close_matches(name, all_field_names(), n=1)
        return f"unknown key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing":
        return f"missing required key {path[-1]!r}" if path else "missing required key"
    if kind in _EXPECT:
        return f"{_EXPECT[kind]}, got {value!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    if isinstance(value, (str, int, float, bool)) and kind != "value_error":
        msg += f", got {value!r}"
    return msg


def validate(model: type[BaseModel], data: dict[str, Any], positions: dict[KeyPath, Where], fallback: Where) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = _locate(data, tuple(err["loc"]))
            where = next((positions[path[:i]] for i in range(len(path), -1, -1) if path[:i] in positions), fallback)
            if err["type"] == "missing":  # point at the mapping that lacks it
                where = next(
                    (positions[path[:i]] for i in range(len(path) - 1, -1, -1) if path[:i] in positions), fallback
                )
            problems.append(Problem(where, show_path(path), _message(err, path)))
        raise RecipeError(problems) from None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Load, merge, override, interpolate and validate a recipe. Raises RecipeError."""
    file = Path(path)
    data, positions = _load_tree(file.resolve(), (file.resolve(),))
    for override in overrides:
        apply_set(data, positions, override)
    data = interpolate(data, positions)
    recipe = validate(Recipe, data, positions, Where(_display(file)))
    return LoadedRecipe(recipe, file, data, positions)
