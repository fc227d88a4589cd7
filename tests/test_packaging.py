"""A non-editable install carries the whole config tree and the Hydra sweeper plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agecls.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_ships_config_and_plugin(tmp_path):
    target = tmp_path / "site"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    shipped = sorted(
        p.relative_to(target / "agecls" / "conf") for p in (target / "agecls" / "conf").rglob("*.yaml")
    )
    assert shipped == sorted(p.relative_to(CONFIG_DIR) for p in CONFIG_DIR.rglob("*.yaml"))
    assert (target / "hydra_plugins" / "agecls_sweeper" / "optuna_sweeper.py").is_file()

    env = {**os.environ, "PYTHONPATH": str(target), "AGECLS_OUTPUT_DIR": str(tmp_path / "out")}
    probe = "import agecls.config as c; print(c.CONFIG_DIR)"
    where = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd="/")
    assert where.stdout.strip() == str(target / "agecls" / "conf")
    shown = subprocess.run(
        [sys.executable, "-m", "agecls.cli.train", "sweep=optuna_bins", "--cfg", "hydra"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "hydra_plugins.agecls_sweeper.optuna_sweeper.AgeclsOptunaSweeper" in shown.stdout
