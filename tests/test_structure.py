"""The package's import graph: no circles, no package import hidden inside a function, nothing re-exported
through `__getattr__` (issue 18). Read from the source with `ast`, so a new circle fails here first."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"lightning_veripo": REPO / "lightning_veripo", "lightning_veripo.callbacks": REPO / "callbacks"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            if package == "lightning_veripo" and path.is_relative_to(SOURCES["lightning_veripo.callbacks"]):
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(tree: ast.AST, top_level: bool) -> list[tuple[str, int]]:
    nodes = tree.body if top_level else [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    found = []
    for node in nodes:
        inner = [node] if top_level else list(ast.walk(node))
        for n in inner:
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("lightning_veripo"):
                # `from lightning_veripo import losses` imports the module lightning_veripo.losses
                subs = [f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in MODULES]
                found += [(m, n.lineno) for m in subs] or [(n.module, n.lineno)]
            elif isinstance(n, ast.Import):
                found += [(a.name, n.lineno) for a in n.names if a.name.startswith("lightning_veripo")]
    return found


def test_the_package_import_graph_has_no_circle() -> None:
    modules = MODULES
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        # importing a module imports its packages' __init__ too; a package's own __init__ is where it starts
        graph[name] = {m for m, _ in _imports(tree, top_level=True) if m in modules and m != name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, node, nxt]))
            if not state.get(nxt):
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])


def test_no_function_imports_another_module_of_the_package() -> None:
    hidden = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in MODULES.values()
        for module, line in _imports(ast.parse(path.read_text()), top_level=False)
    ]
    assert not hidden, "imports of the package inside functions hide a dependency:\n" + "\n".join(hidden)


def test_no_module_re_exports_through_getattr() -> None:
    """A module-level `__getattr__` may only refuse (raise), never import and return another module's name."""
    for path in MODULES.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                assert not any(isinstance(n, ast.Return) for n in ast.walk(node)), f"{path} re-exports names"
