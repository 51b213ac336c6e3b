"""The package's layers point one way: no module imports another that imports it back,
also through imports inside functions (docs/architecture.md, "Where each decision
lives")."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "webhook"


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
        graph[path.stem] = found - {path.stem}
    return graph


def test_no_module_imports_itself_back_through_any_path():
    graph = imports()
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target == path[0]:
                cycles.append(" -> ".join([*path, target]))
            elif target not in path:
                visit(target, [*path, target])
    for module in sorted(graph):
        visit(module, [module])
    assert cycles == []


def test_the_pure_core_does_no_io():
    """keys, names, selectors, injection, keyguard, decisions, policy, rotation and audit
    decide; none of them
    imports the server, the Kubernetes client, the CLI or the network."""
    graph = imports()
    edges = {"server", "cluster", "localdir", "cli", "cli_keys", "cli_common", "watch"}
    for module in ("keys", "names", "selectors", "injection", "keyguard", "audit",
                   "lifecycle", "admission", "decisions", "podverdicts", "policy", "rotation"):
        assert not graph[module] & edges, (module, graph[module] & edges)
        text = (PACKAGE / f"{module}.py").read_text()
        assert "import kubernetes" not in text and "from kubernetes" not in text
        assert "aiohttp" not in text


def test_the_application_package_imports_the_standard_library_alone():
    """keymount/ is what applications import: never the webhook, and no third-party
    library, but for the example's AES-GCM (cryptography)."""
    found = {}
    for path in sorted((PACKAGE.parent / "keymount").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[path.stem] = sorted(names - set(sys.stdlib_module_names) - {"keymount"})
    assert found == {"__init__": [], "example": ["cryptography"], "keyrule": [], "reader": []}
