"""Several processes opening one fresh sqlite study storage at once (two sweeps started together) succeed."""

from __future__ import annotations

import subprocess
import sys
import time

# Each process says it is ready (optuna imported), then waits for the go file: all open at the same instant.
OPEN = """
import sys, time
from pathlib import Path
import optuna.storages  # imported before the start: the opens race, not the imports
from omegaconf import OmegaConf
from agecls.study import open_study
cfg = OmegaConf.create({
    "storage": sys.argv[1], "study_name": sys.argv[2], "heartbeat_interval": 60, "grace_period": 120,
    "retries": 0, "pruner": {"_target_": "optuna.pruners.NopPruner"},
})
Path(sys.argv[3] + ".ready-" + sys.argv[4]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.001)
open_study(cfg, "maximize")
"""


def test_parallel_opens_of_a_fresh_sqlite_storage_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'optuna.db'}"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN, url, f"study-{i % 2}", str(go), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 120  # generous: imports are slow on a loaded machine
    while len(list(tmp_path.glob("go.ready-*"))) < 4 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-1500:] for p in procs if p.poll()]
        time.sleep(0.01)
    assert len(list(tmp_path.glob("go.ready-*"))) == 4, "the processes never got ready within 120 s"
    go.touch()
    outs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in outs), [out[-1500:] for rc, out in outs if rc != 0]
    import optuna

    names = sorted(s.study_name for s in optuna.get_all_study_summaries(url))
    assert names == ["study-0", "study-1"]
