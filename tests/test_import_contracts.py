"""The layering contracts (pyproject.toml, ``[tool.importlinter]``) hold, and each one catches the
violation it is there for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytest.importorskip("importlinter", reason="import-linter is in the dev extra (pip install .[dev])")

CONTRACTS = {
    "layers": "Layers: front ends",
    "build-time": "The runtime imports no build-time code",
    "torch": "The runtime and the package format never import torch",
    "cycles": "No import cycles between sibling modules",
}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` (its own copy first on the path)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {"PYTHONPATH": str(root), "PATH": "", "HOME": str(root)}
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def _verdicts(output: str) -> dict[str, str]:
    text = " ".join(output.split())
    found = {}
    for key, name in CONTRACTS.items():
        start = text.find(name)
        assert start >= 0, f"contract {name!r} not reported:\n{output}"
        rest = text[start:]
        kept, broken = rest.find("KEPT"), rest.find("BROKEN")
        found[key] = "BROKEN" if broken >= 0 and (kept < 0 or broken < kept) else "KEPT"
    return found


def test_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(_verdicts(result.stdout).values()) == {"KEPT"}


def test_each_contract_catches_its_violation(tmp_path):
    shutil.copytree(REPO / "blipdiffusion_trt", tmp_path / "blipdiffusion_trt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    package = tmp_path / "blipdiffusion_trt"

    def inject(module: str, line: str) -> None:
        path = package / module
        path.write_text(path.read_text() + f"\n\ndef _injected():\n    {line}\n")

    inject("package/layout.py", "from ..runtime import pipeline")  # a lower layer imports a higher one
    inject("runtime/timing.py", "from ..engines.build import build_engines")  # run time imports the builder
    inject("runtime/inputs.py", "import torch")
    inject("export/graphs.py", "from .exporter import export_package")  # exporter already imports graphs
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert _verdicts(result.stdout) == {key: "BROKEN" for key in CONTRACTS}, result.stdout
