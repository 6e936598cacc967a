"""The dependency direction of docs/ARCHITECTURE.md, checked on the source (no imports run)."""
import ast
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("encoding", "dsv4", "dsv4_kernels", "tools", "sandboxes", "agent")

# package -> top-level modules it must never import
FORBIDDEN = {
    "encoding": {"torch", "triton", "dsv4", "dsv4_kernels", "agent", "tools", "sandboxes"},
    "tools": {"torch", "triton", "dsv4", "dsv4_kernels", "agent"},
    "sandboxes": {"torch", "triton", "dsv4", "dsv4_kernels", "agent", "tools"},
    "dsv4": {"agent", "tools", "sandboxes"},
    "dsv4_kernels": {"dsv4", "agent", "tools", "sandboxes", "encoding"},
}

# dsv4's layers, bottom first: a module may import its own layer and the ones below it
DSV4_LAYERS = ("formats", "network", "loading", "runtime")

# Deferred (function-level) imports that close a circle, each with the reason it still exists.
KNOWN_CIRCLES: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module imported, deferred?) for each import of the file; `if TYPE_CHECKING:`
    blocks are left out (they never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, deferred) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:             # relative: only inside our packages
                    module_path = _module_name(path)
                    package = module_path if path.name == "__init__.py" else module_path.rpartition(".")[0]
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1])
                    module = f"{base}.{child.module}" if child.module else base
                else:
                    module = child.module or ""
                found.append((module, deferred))
                for alias in child.names:           # `from pkg import module`
                    found.append((f"{module}.{alias.name}", deferred))
            visit(child, deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def _imported_top_levels(path: Path) -> set[str]:
    return {name.split(".")[0] for name, _ in _imports(path)}


def _dsv4_graph() -> dict[str, set[tuple[str, bool]]]:
    """dsv4 module -> the dsv4 modules it imports (with whether the import is deferred)."""
    modules = {_module_name(p): p for p in (ROOT / "dsv4").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {(m, deferred) for m, deferred in _imports(path)
                       if m in modules and m != name and not (name == "dsv4" or m == "dsv4")}
    return graph


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_dependency_direction(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_top_levels(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return DSV4_LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in DSV4_LAYERS else None


def test_dsv4_modules_live_in_a_layer():
    stray = [m for m in _dsv4_graph() if m != "dsv4" and _layer(m) is None
             and m.split(".")[1] not in DSV4_LAYERS]
    assert not stray, f"dsv4 modules outside {DSV4_LAYERS}: {stray}"


def test_dsv4_layers_import_only_downwards():
    offenders = [f"{m} ({DSV4_LAYERS[_layer(m)]}) imports {t} ({DSV4_LAYERS[_layer(t)]})"
                 for m, targets in _dsv4_graph().items() if _layer(m) is not None
                 for t, _ in targets if _layer(t) is not None and _layer(t) > _layer(m)]
    assert not offenders, "\n".join(offenders)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle found by a depth-first search from each node (small graphs)."""
    found, seen = [], set()
    def walk(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append(path + [nxt])
            elif nxt not in path and nxt > path[0]:
                walk(nxt, path + [nxt])
    for start in sorted(graph):
        walk(start, [start])
    return found


def test_no_import_circles_inside_dsv4():
    graph = {m: {t for t, deferred in targets if (m, t) not in KNOWN_CIRCLES}
             for m, targets in _dsv4_graph().items()}
    circles = _cycles(graph)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_known_circles_are_still_real():
    """An entry of KNOWN_CIRCLES that no longer exists must be deleted, not kept as a licence."""
    graph = _dsv4_graph()
    for source, target in KNOWN_CIRCLES:
        assert any(t == target and deferred for t, deferred in graph[source]), (source, target)


def test_circle_finder_detects_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layering_check_detects_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import torch\nfrom dsv4.network.model import Transformer\n")
    assert _imported_top_levels(bad) == {"torch", "dsv4"}


def test_no_top_level_name_is_claimed_by_another_distribution():
    """Our import names must be ours alone: a name another installed distribution also provides
    (as Hugging Face's `kernels` once did for our kernel package) shadows it or is shadowed."""
    claimed = importlib.metadata.packages_distributions()
    clashes = {name: sorted(set(claimed[name]) - {"dsv4-agent"}) for name in PACKAGES
               if set(claimed.get(name, ())) - {"dsv4-agent"}}
    assert not clashes, f"top-level names also provided by other distributions: {clashes}"
