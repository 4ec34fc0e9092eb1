"""README references cannot drift; the layers import only downward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runner import docs
from runner.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_generated_docs_are_current() -> None:
    found: set[str] = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        found |= docs.markers(text)
        assert docs.update_markers(text, build_parser()) == text, (
            f"run: runner reference --update {path.relative_to(ROOT)}"
        )
    assert found == set(docs.SECTIONS), f"no document holds {set(docs.SECTIONS) - found}"


def test_readme_names_the_ci_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [x for x in ci.splitlines()[1:] if x.strip() and not x.startswith(("#", "set ", "cd "))]
    assert any("pytest" in x for x in commands) and any(x.startswith("pip install") for x in commands)
    for line in commands:
        assert line in readme, f"CI runs {line!r}, which README does not show"


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_stores_import_nothing_from_runner() -> None:
    for path in (ROOT / "stores").rglob("*.py"):
        assert "runner" not in imports(path), path


def test_the_build_knows_no_ml_and_no_duckdb() -> None:
    banned = {"torch", "transformers", "peft", "datasets", "duckdb", "sentence_transformers", "bitsandbytes"}
    for name in ("pipeline.py", "graph.py", "registry.py", "recipe.py", "compile.py"):
        assert not imports(ROOT / "runner" / name) & banned, name


def test_step_modules_import_heavy_libraries_lazily() -> None:
    heavy = {"torch", "transformers", "peft", "datasets", "duckdb", "sentence_transformers", "bitsandbytes", "pyarrow"}
    for path in (ROOT / "runner" / "steps").rglob("*.py"):
        top = ast.parse(path.read_text()).body
        names = set()
        for node in top:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert not names & heavy, f"{path.name} imports {names & heavy} at module level"


def test_pipeline_imports_no_step() -> None:
    tree = ast.parse((ROOT / "runner" / "pipeline.py").read_text())
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in found if m.startswith("runner.steps")}, found


def module_graph() -> dict[str, set[str]]:
    """Which of our modules each of our modules imports, anywhere in it (lazy imports count; a
    `if TYPE_CHECKING:` block does not, as it never runs)."""
    paths = {}
    for path in [*(ROOT / "runner").rglob("*.py"), *(ROOT / "stores").rglob("*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def test_no_import_cycles() -> None:
    graph = module_graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], module, dep] if dep in path else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/python-api.md's example, run as a user would paste it (from the checkout, into its own cache)."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(ROOT)
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "recipes").rglob("*") if p.is_file()}
    exec(compile(code, "python-api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "run source.sample ['never built']" in out and "duplicate" in out
    assert "'step': 'filter.dedup', 'table': 'rejects', 'reason': 'duplicate'" in out
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "recipes").rglob("*") if p.is_file()} == before


def test_the_openai_shapes_and_the_engine_seam_need_no_web_framework_or_ml() -> None:
    """runner/serve's request models, engine protocol, codec and text handling import neither FastAPI nor an ML
    library at module level: they are testable alone, and `runner chat` never loads the web stack."""
    banned = {"fastapi", "starlette", "uvicorn", "torch", "transformers", "peft", "llama_cpp"}
    for name in ("openai", "engine", "codec", "text", "thread", "load", "hf", "llamacpp", "vllm", "batcher"):
        top = ast.parse((ROOT / "runner" / "serve" / f"{name}.py").read_text()).body
        found = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not found & banned, (name, found & banned)
