"""The package installs and works with its declared dependencies only: a fresh venv, the CPU torch
wheel first (as the README's set-up does), then the package without test extras; then the engine
round trip of clean_venv_flow.py (numpy blocked) and `dsv4-agent --help`."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"          # the CPU wheel of this machine kind (scripts/setup.sh installs the same)

pytestmark = pytest.mark.slow


def _run(*cmd: str | Path, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _source_copy(dest: Path) -> Path:
    """The project's files without build outputs, so the install builds from a clean tree."""
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__",
                                    ".whl", ".carry", ".hypothesis", ".pytest_cache")
    return Path(shutil.copytree(ROOT, dest, ignore=ignore))


def test_declared_dependencies_suffice(tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, timeout=300)
    py = venv / "bin" / "python"
    _run(py, "-m", "pip", "install", "-q", TORCH, timeout=1200)
    _run(py, "-m", "pip", "install", "-q", _source_copy(tmp_path / "src"), timeout=1200)

    extras = {"pytest", "hypothesis", "transformers"}
    installed = _run(py, "-m", "pip", "list", "--format=freeze", timeout=120).stdout.lower()
    assert not {name for name in extras if f"\n{name}==" in "\n" + installed}, installed

    flow = _run(py, HERE / "clean_venv_flow.py", timeout=600)
    assert "clean-venv flow ok" in flow.stdout
    cli = _run(venv / "bin" / "dsv4-agent", "--help", timeout=120)
    assert "run" in cli.stdout and "serve" in cli.stdout
