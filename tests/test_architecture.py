"""The import rule (docs/DESIGN-NOTES.md, "Layout"): the parts of mcpbalancer are layers, a module
imports only from its own part or from the parts below it, and no module imports itself back by any
path. Every import counts: at module level, under `if TYPE_CHECKING:` and inside functions, because
a circle that only the type checker sees is still a circle in the design.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "mcpbalancer"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The parts, bottom first. A part is a subpackage or a top-level module; `__init__` is the root
# package itself (the version number).
LAYERS = (
    "__init__",
    "errors",
    "protocol",
    "fileaccess",
    "config",
    "observability",
    "process",
    "store",
    "fleet",
    "routing",
    "filters",
    "dataplane",
    "control",
    "app",
    "cli",
    "__main__",
)
RANK = {part: rank for rank, part in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def part_of(module: str) -> str:
    """The layer a module belongs to: its first name below the package."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def imported(module: str, source: str, *, package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, module) for every mcpbalancer module that `module` imports, wherever the import is."""
    here = module if package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: here.count(".") + 2 - node.level]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from mcpbalancer import protocol` imports the module mcpbalancer.protocol.
                submodule = f"{base}.{alias.name}"
                yield from _known(node.lineno, submodule if submodule in MODULES else base)


def _known(line: int, name: str) -> Iterator[tuple[int, str]]:
    # `import a.b.c` loads a.b.c; its packages load too, but they are not what the module uses.
    if name in MODULES:
        yield line, name


GRAPH = {
    module: sorted(set(imported(module, path.read_text(), package=path.name == "__init__.py")))
    for module, path in MODULES.items()
}


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = sorted(m for m in MODULES if part_of(m) not in RANK)
    assert not unplaced, (
        f"modules outside every layer (add them to a part, or the part to LAYERS): {unplaced}"
    )


def test_imports_only_point_down() -> None:
    upward = [
        f"{module}:{line} imports {target} ({part_of(module)} is below {part_of(target)})"
        for module, edges in GRAPH.items()
        for line, target in edges
        if RANK.get(part_of(target), -1) > RANK.get(part_of(module), len(LAYERS))
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def path_back(start: str, goal: str, graph: dict[str, set[str]]) -> list[str] | None:
    """The shortest import path from `start` to `goal`, if there is one."""
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        if module == goal:
            path = [module]
            while (previous := came_from[path[-1]]) is not None:
                path.append(previous)
            return path[::-1]
        for target in sorted(graph[module]):
            if target not in came_from:
                came_from[target] = module
                queue.append(target)
    return None


def test_no_import_circles() -> None:
    graph = {module: {target for _, target in edges} for module, edges in GRAPH.items()}
    circles = []
    for module, targets in graph.items():  # every import that is part of a circle, with the circle
        for target in sorted(targets):
            back = path_back(target, module, graph)
            if back is not None:
                circles.append(" -> ".join([module, *back]))
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_walk_sees_every_kind_of_import() -> None:
    """The rule is only as good as the walk: it finds imports at module level, under TYPE_CHECKING,
    inside functions, relative ones, and a submodule named in `from package import module`."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from mcpbalancer import errors\n"
        "import mcpbalancer.config\n"
        "if TYPE_CHECKING:\n"
        "    from mcpbalancer.store import base\n"
        "def f() -> None:\n"
        "    from ..store import memory\n"
        "    from . import upstream\n"
    )
    found = {target for _, target in imported("mcpbalancer.dataplane.probe", source)}
    assert found == {
        "mcpbalancer.errors",
        "mcpbalancer.config",
        "mcpbalancer.store.base",
        "mcpbalancer.store.memory",
        "mcpbalancer.dataplane.upstream",
    }
