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


def _declared(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, normalised (PEP 503)."""
    import re

    return {re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]).lower() for r in requirements}


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    import ast
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _declared(project["dependencies"])
    imported: dict[str, str] = {}
    for source in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                imported.setdefault(name.split(".")[0], str(source.relative_to(ROOT)))
    ours = {"agecls", "hydra_plugins", "__future__"}
    third_party = {m: f for m, f in imported.items() if m not in ours and m not in sys.stdlib_module_names}
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: (where, providers.get(module))
        for module, where in third_party.items()
        if not _declared(providers.get(module, [module])) & declared
    }
    assert undeclared == {}, "imported but not in [project].dependencies: module: (first file, distribution)"
    assert {"pyyaml", "starlette", "filelock", "sqlalchemy"} <= declared
    assert "fcntl" not in imported, (
        f"{imported.get('fcntl')} imports fcntl, which Windows lacks (use files.file_lock)"
    )


def test_extras_and_lower_bounds_match_what_the_code_uses():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: _declared(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert extras["postgres"] == {"psycopg"} and extras["dashboard"] == {"optuna-dashboard"}
    assert "agecls" in extras["dev"], "dev pulls in the postgres and dashboard extras for the cluster tests"
    bounds = {r.split(">=")[0]: r.split(">=")[1].split(",")[0] for r in project["dependencies"] if ">=" in r}
    # lightning.pytorch.callbacks.WeightAveraging (training/ema.py) is new in 2.6; RDBStorage's
    # heartbeat_stale_trial_callback and RetryHeartbeatStaleTrialCallback (study.py) in Optuna 4.9
    assert (bounds["lightning"], bounds["optuna"]) == ("2.6", "4.9")
    from lightning.pytorch.callbacks import WeightAveraging  # noqa: F401
    from optuna.storages import RetryHeartbeatStaleTrialCallback  # noqa: F401


def test_agecls_imports_and_locks_files_without_fcntl(tmp_path):
    """Where there is no fcntl (Windows), agecls's file lock still works; no other module of the package
    imports fcntl (the import test above lists them all)."""
    probe = (
        "import sys; sys.modules['fcntl'] = None\n"
        "from agecls.files import file_lock\n"
        f"with file_lock({str(tmp_path / 'a' / 'x.lock')!r}):\n"
        "    print('locked')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "locked"


def test_file_lock_excludes_a_second_process(tmp_path):
    import time

    from agecls.files import file_lock

    lock, ready = tmp_path / "x.lock", tmp_path / "ready"
    probe = (
        "import pathlib, time; from agecls.files import file_lock\n"
        f"pathlib.Path({str(ready)!r}).touch(); t = time.monotonic()\n"
        f"with file_lock({str(lock)!r}): print(round(time.monotonic() - t, 1))\n"
    )
    with file_lock(lock):
        other = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # the other process is now waiting for the lock
    waited = float(other.communicate(timeout=60)[0])
    assert waited >= 1.0, f"the second process got the lock after {waited} s, while it was held"
