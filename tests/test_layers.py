"""The package's folders are its architecture: each subpackage imports only from the layers below
it, and no modules import each other in a circle. Imports inside functions count too: they run
as surely as those at the top, only later."""

from __future__ import annotations

import ast
from pathlib import Path

import raybooth

PACKAGE = Path(raybooth.__file__).parent

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = ("errors", "terminal", "config", "files", "models", "world", "generate", "watch", "train", "driver",
          "evaluate", "jobs", "commands")
ENTRY = "__main__"  # `python -m raybooth`: above every layer


def module_name(path: Path) -> str:
    parts = ("raybooth",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """The raybooth modules `path` imports, at the top or inside functions, both spellings."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # a name imported from a module: the module
                candidate = candidate.rpartition(".")[0]
            if candidate.startswith("raybooth") and candidate != name:
                found.add(candidate)
                break
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): package_imports(path, modules) for path in paths}


def layer(module: str) -> int:
    """The layer's rank; the package's own `__init__` (its version) is at the bottom with errors."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if parts[1] == ENTRY:
        return len(LAYERS)
    assert parts[1] in LAYERS, f"{module} is in no layer: add its folder to LAYERS"
    return LAYERS.index(parts[1])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_every_module_sits_in_a_layer_and_imports_only_below():
    upward = [f"{module} ({LAYERS[layer(module)] if layer(module) < len(LAYERS) else ENTRY}) imports {target} "
              f"({LAYERS[layer(target)]})"
              for module, targets in graph().items() for target in targets if layer(target) > layer(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_see_what_they_are_meant_to():
    # The walk finds imports made inside functions and relative ones, and the cycle finder finds a circle.
    edges = graph()
    assert "raybooth.driver.generation" in edges["raybooth.driver.local_generation"] or \
        "raybooth.driver.local_generation" in edges["raybooth.driver.generation"]
    assert "raybooth.jobs.run" in edges["raybooth.commands.cli"]  # imported inside run_command
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_past_250_lines():
    long = {module_name(path): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 250}
    assert not long, long
