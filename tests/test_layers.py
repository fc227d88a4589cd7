"""The package's layers hold: import-linter's contracts (pyproject.toml) pass on the real tree, and fail,
naming the import, when a lower layer imports a higher one or two modules import each other."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")


def lint(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports over the copy of the package in `tree`/src with the project's contracts."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tree,
        env={"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def tree(tmp_path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        ROOT / "src" / "agecls", tmp_path / "src" / "agecls", ignore=shutil.ignore_patterns("conf")
    )
    return tmp_path


def test_the_package_keeps_its_layers_and_has_no_import_cycles(tree):
    result = lint(tree)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tree):
    bins = tree / "src" / "agecls" / "data" / "bins.py"
    bins.write_text(bins.read_text() + "\n\ndef _upward():\n    from agecls.training import train  # noqa\n")
    result = lint(tree)
    assert result.returncode == 1
    assert "agecls.data is not allowed to import agecls.training" in result.stdout
    assert "agecls.data.bins -> agecls.training.train" in result.stdout


def test_a_cycle_inside_a_layer_breaks_the_acyclic_contract(tree):
    bootstrap = tree / "src" / "agecls" / "evaluation" / "bootstrap.py"
    bootstrap.write_text(
        bootstrap.read_text() + "\n\ndef _loop():\n    from agecls.evaluation import compare  # noqa\n"
    )
    result = lint(tree)
    assert result.returncode == 1
    assert "No cycles are allowed in agecls.evaluation" in result.stdout
