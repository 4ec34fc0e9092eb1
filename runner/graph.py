"""The step graph: nodes with their upstream steps, checked for cycles, in a stable order."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import RunnerError


@dataclass(frozen=True)
class StepNode:
    """One step: a registered kind, validated params, upstream step names, external files.

    `files` maps a label (the path as the recipe spells it) to the resolved path; the
    key hashes the label and the file's content, never the resolved path.
    """

    name: str
    kind: str
    params: Any
    inputs: tuple[str, ...] = ()
    files: dict[str, Path] = field(default_factory=dict)
    origin: str = ""


class GraphError(RunnerError):
    """The steps do not form a graph (a cycle, an input no step provides)."""

    exit_code = 2


class Graph:
    def __init__(self, nodes: Iterable[StepNode]) -> None:
        self.nodes: dict[str, StepNode] = {}
        for node in nodes:
            if node.name in self.nodes:
                raise GraphError(f"two steps are named {node.name!r} ({node.origin}); give one a different name")
            self.nodes[node.name] = node
        for node in self.nodes.values():
            for up in node.inputs:
                if up not in self.nodes:
                    raise GraphError(f"step {node.name!r} ({node.origin}) reads {up!r}, which is not a step")
        self.order = self._toposort()

    def _toposort(self) -> list[str]:
        """Depth-first, in declaration order, so the order is stable; a cycle is reported with its path."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done

        def visit(name: str, stack: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = [*stack[stack.index(name) :], name]
                raise GraphError(f"steps form a cycle: {' -> '.join(cycle)}")
            state[name] = 1
            for up in self.nodes[name].inputs:
                visit(up, [*stack, name])
            state[name] = 2
            order.append(name)

        for name in self.nodes:
            visit(name, [])
        return order

    def downstream(self, name: str) -> set[str]:
        """Every step that reads `name`, directly or not."""
        found: set[str] = set()
        for n in self.order:
            if any(up == name or up in found for up in self.nodes[n].inputs):
                found.add(n)
        return found

    def upstream(self, name: str) -> set[str]:
        found: set[str] = set()
        todo = list(self.nodes[name].inputs)
        while todo:
            up = todo.pop()
            if up not in found:
                found.add(up)
                todo.extend(self.nodes[up].inputs)
        return found

    def select(self, targets: Iterable[str]) -> Graph:
        """The subgraph that builds `targets`."""
        keep: set[str] = set()
        for t in targets:
            if t not in self.nodes:
                raise GraphError(f"no step {t!r}; steps: {', '.join(self.order)}")
            keep |= {t} | self.upstream(t)
        return Graph(self.nodes[n] for n in self.order if n in keep)

    def mermaid(self) -> str:
        lines = ["graph TD"]
        ids = {name: f"s{i}" for i, name in enumerate(self.order)}
        for name in self.order:
            lines.append(f'  {ids[name]}["{name}<br/><small>{self.nodes[name].kind}</small>"]')
        for name in self.order:
            for up in self.nodes[name].inputs:
                lines.append(f"  {ids[up]} --> {ids[name]}")
        return "\n".join(lines)
