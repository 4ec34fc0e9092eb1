"""Recipe loading: extends, ${...} interpolation, --set overrides, and where errors point."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import recipe
from runner.errors import RecipeError

BASE = """\
vars:
  minimum: 7
data:
  sources:
    - name: s
      format: jsonl
      path: rows.jsonl
  filters:
    - kind: length
      min_chars: ${vars.minimum}
  split:
    validation: 0.2
    seed: 3
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_interpolation_keeps_type(tmp_path: Path) -> None:
    r = recipe.load(write(tmp_path, "r.yaml", BASE)).recipe
    assert r.data.filters[0].min_chars == 7


def test_embedded_interpolation_is_text(tmp_path: Path) -> None:
    text = BASE.replace(
        "      min_chars: ${vars.minimum}",
        "      min_chars: 1\n    - kind: sql\n      where: length(id) > ${vars.minimum}",
    )
    r = recipe.load(write(tmp_path, "r.yaml", text)).recipe
    assert r.data.filters[1].where == "length(id) > 7"


def test_extends_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    write(tmp_path, "base/base.yaml", BASE)
    child = write(
        tmp_path, "child.yaml", "extends: base/base.yaml\nvars:\n  minimum: 9\ndata:\n  split:\n    seed: 5\n"
    )
    loaded = recipe.load(child)
    r = loaded.recipe
    assert r.data.split.seed == 5 and r.data.split.validation == 0.2  # merged, not replaced
    assert r.data.filters[0].min_chars == 9  # interpolation sees the child's vars
    # a path written in the base resolves relative to the base file
    assert loaded.base_dir(("data", "sources", 0, "path")) == (tmp_path / "base").resolve()
    assert str(loaded.where(("data", "split", "seed"))).endswith("child.yaml:6")
    assert str(loaded.where(("data", "split", "validation"))).endswith("base.yaml:12")


def test_extends_as_a_list_and_nested(tmp_path: Path) -> None:
    write(tmp_path, "base/base.yaml", BASE)
    write(tmp_path, "seed.yaml", "data:\n  split:\n    seed: 11\n")
    one = recipe.load(write(tmp_path, "one.yaml", "extends: [base/base.yaml]\n")).recipe
    assert one.data.split.seed == 3
    # later bases win over earlier ones, the recipe over both
    two = recipe.load(write(tmp_path, "two.yaml", "extends: [base/base.yaml, seed.yaml]\nvars: {minimum: 2}\n"))
    assert two.recipe.data.split.seed == 11 and two.recipe.data.filters[0].min_chars == 2
    assert str(two.where(("data", "split", "seed"))).endswith("seed.yaml:3")
    nested = recipe.load(write(tmp_path, "nested.yaml", "extends: two.yaml\ndata: {split: {validation: 0.5}}\n")).recipe
    assert nested.data.split.seed == 11 and nested.data.split.validation == 0.5


def test_set_overrides_with_yaml_values(tmp_path: Path) -> None:
    r = recipe.load(write(tmp_path, "r.yaml", BASE), ["data.filters.0.min_chars=11", "data.split.seed=8"]).recipe
    assert r.data.filters[0].min_chars == 11 and r.data.split.seed == 8


def test_set_appends_to_a_list(tmp_path: Path) -> None:
    r = recipe.load(write(tmp_path, "r.yaml", BASE), ["data.filters.1={kind: dedup}"]).recipe
    assert [f.kind for f in r.data.filters] == ["length", "dedup"]


def test_all_validation_errors_reported_together(tmp_path: Path) -> None:
    text = BASE.replace("validation: 0.2", "validation: lots").replace("seed: 3", "seed: three")
    with pytest.raises(RecipeError) as exc:
        recipe.load(write(tmp_path, "r.yaml", text))
    found = sorted((str(p.where).rsplit("/", 1)[-1], p.path) for p in exc.value.problems)
    assert found == [("r.yaml:12", "data.split.validation"), ("r.yaml:13", "data.split.seed")]


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    text = BASE.replace("min_chars: ${vars.minimum}", "min_char: 3")
    with pytest.raises(RecipeError) as exc:
        recipe.load(write(tmp_path, "r.yaml", text))
    msg = str(exc.value)
    assert "data.filters[0].min_char" in msg and "did you mean 'min_chars'" in msg and "r.yaml:10" in msg
