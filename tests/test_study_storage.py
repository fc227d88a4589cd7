"""Several processes opening one fresh sqlite study storage at once (two sweeps started together) succeed."""

from __future__ import annotations

import subprocess
import sys
import time

OPEN = """
import sys, time
from omegaconf import OmegaConf
from agecls.study import open_study
cfg = OmegaConf.create({
    "storage": sys.argv[1], "study_name": sys.argv[2], "heartbeat_interval": 60, "grace_period": 120,
    "retries": 0, "pruner": {"_target_": "optuna.pruners.NopPruner"},
})
while time.time() < float(sys.argv[3]):  # start together
    time.sleep(0.001)
open_study(cfg, "maximize")
"""


def test_parallel_opens_of_a_fresh_sqlite_storage_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'optuna.db'}"
    start = time.time() + 8  # after every process has imported optuna
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN, url, f"study-{i % 2}", str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    outs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in outs), [out[-1500:] for rc, out in outs if rc != 0]
    import optuna

    names = sorted(s.study_name for s in optuna.get_all_study_summaries(url))
    assert names == ["study-0", "study-1"]
