"""Every recipe shipped in recipes/ validates and compiles."""

from collections.abc import Callable
from pathlib import Path

import pytest

from runner import api

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path: Path) -> None:
    build = api.load(path)
    assert build.graph.order, "a recipe compiles to at least one step"


@pytest.mark.parametrize("path", [p for p in RECIPES if p.with_name(p.name + ".lock").exists()], ids=lambda p: p.name)
def test_committed_locks_match_their_recipes(path: Path, cli: Callable[..., tuple[int, str, str]]) -> None:
    """A step whose key moved (a new step version, a changed default) without its lock regenerated would make
    `apply --locked` refuse the shipped recipe, and the README's first apply rewrite a committed file."""
    code, _, err = cli("lock", str(path), "--check")
    assert code == 0, err
