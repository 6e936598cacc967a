"""The dependency direction of docs/ARCHITECTURE.md, checked on the source (no imports run)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "encoding": {"torch", "triton", "dsv4", "kernels", "agent", "tools", "sandboxes"},
    "tools": {"torch", "triton", "dsv4", "kernels", "agent"},
    "sandboxes": {"torch", "triton", "dsv4", "kernels", "agent", "tools"},
    "dsv4": {"agent", "tools", "sandboxes"},
    "kernels": {"agent", "tools", "sandboxes", "encoding"},
}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_dependency_direction(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_top_levels(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_layering_check_detects_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import torch\nfrom dsv4.model import Transformer\n")
    assert _imported_top_levels(bad) == {"torch", "dsv4"}
