"""Every recipe shipped in recipes/ validates and compiles."""

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
