"""Trials forked from the pre-imported template process (agecls.sweep.template): each behaves as a fresh
`python -m module args` would (arguments, environment, folder, output, exit code, threads), trials run at
once without touching each other, and the executor falls back to fresh processes when the template dies."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from omegaconf import OmegaConf

from agecls.sweep.checks import SweepError
from agecls.sweep.executors import ProcessHandle, SubprocessExecutor
from agecls.sweep.template import Template

PROBE = """
import json, os, sys, threading, time
import torch
if sys.argv[1] == "crash":
    raise RuntimeError("boom")
if sys.argv[1] == "sleep":
    time.sleep(float(sys.argv[2]))
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("AGECLS_PROBE"), "pid": os.getpid(),
    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_initialized(),
    "python_threads": threading.active_count(), "lightning": "lightning" in sys.modules,
}))
sys.exit(int(sys.argv[2]) if sys.argv[1] == "exit" else 0)
"""


@pytest.fixture(scope="module")
def template():
    made = Template()
    made.wait_ready()
    yield made
    made.close()


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "agecls_probe.py").write_text(PROBE)
    return tmp_path


def _run(template, folder, *args, env=None, timeout=60):
    log = folder / f"probe-{'-'.join(args)}.log"
    handle = template.start([sys.executable, "-m", "agecls_probe", *args], env or {}, log, cwd=str(folder))
    handle.wait(timeout)
    return handle, log


def test_a_forked_trial_sees_its_arguments_environment_folder_and_threads(template, probe):
    import json

    handle, log = _run(template, probe, "show", env={"AGECLS_PROBE": "yes", "OMP_NUM_THREADS": "1"})
    assert handle.done() and handle.returncode == 0, log.read_text()
    seen = json.loads(log.read_text().strip().splitlines()[-1])
    assert seen["argv"][1:] == ["show"] and seen["cwd"] == str(probe) and seen["env"] == "yes"
    assert seen["threads"] == 1, "OMP_NUM_THREADS of the slot, though torch was imported before it was set"
    assert seen["cuda"] is False and seen["python_threads"] == 1
    assert seen["lightning"], "the template imported what a trial imports"


def test_exit_codes_pass_through_as_from_a_fresh_interpreter(template, probe):
    assert _run(template, probe, "exit", "3")[0].returncode == 3
    handle, log = _run(template, probe, "crash")
    assert handle.returncode == 1 and "RuntimeError: boom" in log.read_text()


def test_trials_run_at_once_and_a_killed_one_leaves_the_other(template, probe):
    started = time.monotonic()
    slow = template.start(
        [sys.executable, "-m", "agecls_probe", "sleep", "3"], {}, probe / "a.log", str(probe)
    )
    doomed = template.start(
        [sys.executable, "-m", "agecls_probe", "sleep", "60"], {}, probe / "b.log", str(probe)
    )
    assert slow.pid != doomed.pid
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    assert doomed.done() and doomed.returncode == -signal.SIGKILL
    slow.wait(30)
    assert slow.returncode == 0 and time.monotonic() - started < 20


def test_executor_starts_fresh_processes_when_the_template_is_gone(tmp_path, probe):
    executor = SubprocessExecutor(OmegaConf.create({"n_jobs": 1, "devices": None, "trial_start": "template"}))
    executor.prepare()
    executor.template.process.kill()
    executor.template.process.wait()
    cmd = [sys.executable, "-c", "print('fresh')"]  # not `-m`: always a fresh interpreter
    assert isinstance(executor.start(cmd, {}, tmp_path / "c.log", "c"), ProcessHandle)
    cmd = [sys.executable, "-m", "agecls_probe", "show"]
    handle = executor.start(cmd, {"PYTHONPATH": str(probe)}, tmp_path / "m.log", "m")
    assert isinstance(handle, ProcessHandle) and not executor.use_template
    handle.wait(60)
    assert handle.process.returncode == 0


def test_trial_start_is_checked():
    with pytest.raises(SweepError, match="optuna.trial_start='forked'; valid: template, fresh"):
        SubprocessExecutor(OmegaConf.create({"n_jobs": 1, "devices": None, "trial_start": "forked"}))


def test_what_the_preloaded_modules_print_does_not_break_the_template(tmp_path, monkeypatch, probe):
    """A library printing on stdout while the template imports goes to stderr, not into its answers."""
    (tmp_path / "sitecustomize.py").write_text("print('a library says hello on stdout')\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    noisy = Template()
    try:
        handle, log = _run(noisy, probe, "exit", "0")
        assert handle.returncode == 0, log.read_text()
    finally:
        noisy.close()


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("optuna.trial_start=forked", "optuna.trial_start='forked'; valid: template, fresh"),
        ("optuna.n_jobs=0", "optuna.n_jobs=0; valid: an integer >= 1 (trials at once)"),
    ],
)
def test_a_bad_trial_setting_is_one_line_before_anything_starts(tmp_path, setting, line):
    import subprocess

    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", "experiment=demo", "sweep=demo", setting]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"agecls-train: error: {line}"], (
        done.stderr
    )
