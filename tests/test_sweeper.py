"""Optuna studies via `agecls-train -m sweep=...`: search space, async trials, pruning, failures, resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from tests.conftest import FAST_OVERRIDES

from agecls.cli.report import main as report_main
from agecls.config import CONFIG_DIR
from agecls.sweep.checks import SweepError
from agecls.sweep.space import format_value, search_space

TINY = [*FAST_OVERRIDES, "trainer.max_epochs=2", "data.synthetic.n=300"]


def test_search_space_maps_hydra_sweep_syntax_to_optuna():
    params = {
        "optimizer": "choice(adam, nadam)",
        "optimizer.lr": "tag(log, interval(1e-5, 1e-2))",
        "model.blocks": "range(2, 5)",
        "model.dropout": "interval(0.1, 0.7)",
        "model.hidden": "64",
    }
    space, fixed = search_space(params, ["model.dropout=0.5", "bins=seed7,four"], OverridesParser.create())
    assert space["optimizer"] == CategoricalDistribution(["adam", "nadam"])
    assert space["optimizer.lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert space["model.blocks"] == IntDistribution(2, 5)  # both ends, as hydra-optuna-sweeper
    assert space["bins"] == CategoricalDistribution(["seed7", "four"])
    assert "model.dropout" not in space, "a fixed command-line value overrides the configured range"
    assert fixed == ["model.hidden=64", "model.dropout=0.5"]
    assert format_value(1e-05) == "1e-05" and format_value(True) == "true" and format_value(None) == "null"


# hydra-optuna-sweeper's own cases (its tests/test_optuna_sweeper_plugin.py), in today's Optuna names
PLUGIN_CASES = [
    ("key=choice(1,2)", CategoricalDistribution([1, 2])),
    ("key=choice(true, false)", CategoricalDistribution([True, False])),
    ("key=choice('hello', 'world')", CategoricalDistribution(["hello", "world"])),
    ("key=shuffle(range(1,3))", CategoricalDistribution((1, 2))),
    ("key=range(1,3)", IntDistribution(1, 3)),
    ("key=interval(1, 5)", FloatDistribution(1, 5)),
    ("key=int(interval(1, 5))", IntDistribution(1, 5)),
    ("key=tag(log, interval(1, 5))", FloatDistribution(1, 5, log=True)),
    ("key=tag(log, int(interval(1, 5)))", IntDistribution(1, 5, log=True)),
    ("key=range(0.5, 5.5, step=1)", FloatDistribution(0.5, 5.5, step=1)),
    # its grid test's config, and values it passes on as override text
    ("y=range(-1.0, 1.0, step=1)", FloatDistribution(-1.0, 1.0, step=1.0)),
    ('z=choice("foo", "bar")', CategoricalDistribution(["foo", "bar"])),
    ("key=range(0, 10, step=5)", IntDistribution(0, 10, step=5)),
    ("key=choice([1,2], [3])", CategoricalDistribution(["[1,2]", "[3]"])),
]


@pytest.mark.parametrize(("line", "expected"), PLUGIN_CASES)
def test_the_plugins_grammar_gives_the_plugins_distributions(line, expected):
    key, text = line.split("=", 1)
    space, fixed = search_space({}, [line], OverridesParser.create())
    # the same text in optuna.params (a sweep file) gives the same distribution
    configured = search_space({key: text}, [], OverridesParser.create())[0][key]
    assert fixed == []
    if text.startswith("shuffle"):  # shuffle() orders the choices at random
        assert set(space[key].choices) == set(configured.choices) == set(expected.choices)
    else:
        assert space[key] == configured == expected


@pytest.mark.parametrize(
    ("lines", "distributions", "fixed"),
    [
        (["key=choice(1,2)"], {"key": CategoricalDistribution([1, 2])}, []),
        (["key=5"], {}, ["key=5"]),
        (["key1=choice(1,2)", "key2=5"], {"key1": CategoricalDistribution([1, 2])}, ["key2=5"]),
        (
            ["key1=choice(1,2)", "key2=5", "key3=range(1,3)"],
            {"key1": CategoricalDistribution([1, 2]), "key3": IntDistribution(1, 3)},
            ["key2=5"],
        ),
    ],
)
def test_searched_and_fixed_keys_split_as_in_the_plugin(lines, distributions, fixed):
    assert search_space({}, lines, OverridesParser.create()) == (distributions, fixed)


def test_a_range_that_cannot_be_a_distribution_or_bad_text_is_a_clear_error():
    with pytest.raises(SweepError, match=r"^command line: key=range\(5,1\): .*low"):
        search_space({}, ["key=range(5,1)"], OverridesParser.create())
    with pytest.raises(SweepError, match=r"^optuna.params: key=choice\(null, 1\): .*NoneType is incompat"):
        search_space({"key": "choice(null, 1)"}, [], OverridesParser.create())


def test_unsupported_sweep_is_a_clear_error():
    with pytest.raises(SweepError, match="model.blocks"):
        search_space({"model.blocks": "glob(*)"}, [], OverridesParser.create())


def _start(out: Path, *args: str) -> subprocess.Popen:
    """`agecls-train -m` on the TINY run with `args`, its stdout and stderr into files beside `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, *args]
    with open(out.parent / "stdout.txt", "w") as stdout, open(out.parent / "stderr.txt", "w") as stderr:
        return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=out.parent)


def _finish(proc: subprocess.Popen, out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Wait for a sweep of `_start` and return what it printed, as `subprocess.run` would."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    texts = [(out.parent / name).read_text() for name in ("stdout.txt", "stderr.txt")]
    return subprocess.CompletedProcess(proc.args, proc.returncode, *texts)


def _sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    return _finish(_start(out, *args), out)


def _study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out}/optuna.db")


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def _start_training_sweep(tmp_path: Path, out: Path, args: list[str], trial: int = 0) -> subprocess.Popen:
    """A sweep (own process group) whose trial `trial` cannot finish soon; returns once it is training."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    slow = ["trainer.max_epochs=1000", "callbacks.early_stopping.enabled=false"]
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, *slow, *args]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # As in a terminal: Ctrl-C interrupts (a background job of a non-interactive shell ignores SIGINT,
        # and ignored signals are inherited; CI may run the suite that way).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300  # generous: start-up is slow when the machine is loaded
    while time.monotonic() < deadline:  # until the trial's process has logged an epoch
        logs = list(out.glob(f"multiruns/*/*/trial-{trial:04d}/train.log"))
        if logs and "epoch 1" in logs[0].read_text():
            return proc
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the trial never started training within 300 s: {proc.communicate()[1][-2000:]!r}")


@pytest.mark.slow
def test_study_runs_trials_in_parallel_records_mlflow_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [
        "sweep=optuna_optimizers",
        "optuna.study_name=s1",
        "optuna.enqueue=[{optimizer: nadam, optimizer.weight_decay: 0.01}]",  # a warm start: runs first, once
        "optuna.n_trials=2",
        "optuna.n_jobs=2",
        "optuna/pruner=none",
    ]
    first = _sweep(out, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    study = _study(out, "s1")
    # The console names each trial's log file when it starts and shows the study's state (not a terminal:
    # plain status lines, one per trial event).
    console = first.stdout + first.stderr
    logs = [Path(p) for p in re.findall(r"trial \d started \(slot \d\): .*; log (\S+)", console)]
    assert [p.parent.name for p in sorted(logs)] == ["trial-0000", "trial-0001"]
    assert all(p.name == "process.log" and p.is_file() for p in logs)
    starting = (
        r"status: study s1: 0/2 done \(0 complete, 0 pruned\), 1 running, 0 failed \| \d+s elapsed, time left"
    )
    assert re.search(starting + r" known once a trial ends \| best: none yet", console)
    assert re.search(
        r"status: study s1: 2/2 done \(2 complete, 0 pruned\), 0 running, 0 failed \| .* \| best 0", console
    )
    trial_cfg = OmegaConf.load(logs[0].parent / "config.yaml")
    assert trial_cfg.trainer.enable_progress_bar is False, "a trial's output is a file: no progress bar"
    assert _states(study) == ["COMPLETE", "COMPLETE"]
    starts = sorted(t.datetime_start for t in study.trials)
    ends = sorted(t.datetime_complete for t in study.trials)
    assert starts[1] < ends[0], "two slots: the second trial starts before the first ends"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("optuna_optimizers")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("agecls.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["study/n_complete"] == 2
    best = study.best_trial
    assert parents[0].data.tags["best.run_id"] == best.user_attrs["mlflow_run_id"]
    alias = client.get_model_version_by_alias("agecls-s1", "best")
    assert alias.run_id == best.user_attrs["mlflow_run_id"]
    # The registered version is an MLflow Model that MLflow itself loads (python_function flavor).
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    loaded = mlflow.pyfunc.load_model("models:/agecls-s1@best")
    assert loaded.metadata.get_input_schema().input_names() == ["image"]
    for child in children:
        assert child.data.params["optuna.trial"] == child.data.tags["optuna.trial"]

    # In this process: a console script's start-up costs seconds (test_train_e2e runs agecls-report itself).
    monkeypatch.setenv("AGECLS_OUTPUT_DIR", str(out))
    capsys.readouterr()
    code = report_main(["s1", "--out", str(tmp_path / "rep")])
    report = capsys.readouterr()
    assert code == 0, report.err[-3000:]
    written = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"trials.csv", "compute.json", "optimization_history.png"} <= written
    assert "param_importances.png" not in written  # 2 complete trials: below min_importance_trials
    assert any(name.startswith("confusion_trial") for name in written)
    assert "trials_complete 2" in report.out
    # Its last lines say how to use the best model: a checkpoint and a photo that exist, the registered model.
    use = report.out.split("Use the best model (trial ")[1].splitlines()
    assert use[0] == f"{study.best_trial.number}, val/macro_f1 {study.best_value:.4f}):"
    assert Path(use[1].split("checkpoint: ")[1]).is_file()
    assert use[2] == f"  registered: models:/agecls-s1@best in sqlite:///{out}/mlflow.db"
    predict = dict(w.split("=", 1) for w in use[3].split()[1:])
    assert use[3].split()[0].endswith("agecls-predict") and predict["detect"] == "false"
    assert Path(predict["ckpt"]).is_file() and Path(predict["images"]).is_file()
    assert Path(predict["images"]).parent.name == "synthetic-n300-s0"
    assert use[4].split("#")[0].split()[1:] == [
        "ckpt=models:/agecls-s1@best",
        f"tracking_uri=sqlite:///{out}/mlflow.db",
        "detect=false",
    ]

    # The same command with a larger budget continues the study, and Ctrl-C while its trial trains fails that
    # trial and re-queues its parameters; the command run once more (without the slow settings) runs the
    # re-queued trial: the two first trials are kept, one is added, nothing counts twice.
    again = [*args[:-3], "optuna.n_trials=3", "optuna.n_jobs=1", "optuna/pruner=none"]
    proc = _start_training_sweep(tmp_path, out, again, trial=2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-3000:]
    study = _study(out, "s1")
    assert _states(study) == ["COMPLETE", "COMPLETE", "FAIL", "WAITING"]
    assert study.trials[3].system_attrs["fixed_params"] == study.trials[2].params

    resumed = _sweep(out, *again)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = _study(out, "s1")
    assert _states(study) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"], "the re-queued trial ran once"
    assert study.trials[3].params == study.trials[2].params
    warm = [t for t in study.trials if t.user_attrs.get("warm_start")]
    assert [(t.number, t.params["optimizer"], t.params["optimizer.weight_decay"]) for t in warm] == [
        (0, "nadam", 0.01)
    ]


@pytest.mark.slow
def test_pruned_and_crashed_trials_are_marked_and_tolerated(tmp_path):
    # Two independent studies, each with its own output folder, run at once: the suite is otherwise one
    # process, and a sweep spends most of its time starting Python processes on one core.
    out, crash_out = tmp_path / "pruned" / "out", tmp_path / "crashed" / "out"
    # Every trial is below the threshold after its first epoch: all are pruned, none fails.
    pruning = _start(
        out,
        "sweep=optuna_optimizers",
        "optuna.study_name=p",
        "optuna.n_trials=2",
        "optuna/pruner=threshold",
        "optuna.pruner.lower=1.01",
        "optuna.pruner.n_warmup_steps=0",
    )
    # Every trial loads pretrained weights from a file that is not there, which only the run finds out: every
    # trial fails; the sweep stops after max_failures and says why in one line.
    crashing = _start(
        crash_out,
        "sweep=optuna_optimizers",
        "optuna.study_name=c",
        "optuna.n_trials=5",
        "optuna.max_failures=1",
        f"model.weights={tmp_path / 'missing.pt'}",
    )
    pruned = _finish(pruning, out)
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    study = _study(out, "p")
    assert _states(study) == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [1] for t in study.trials)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name("optuna_optimizers").experiment_id],
        filter_string="tags.trial_state = 'PRUNED'",
    )
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}

    crashed = _finish(crashing, crash_out)
    assert crashed.returncode == 1 and "Traceback" not in crashed.stderr
    failed = _study(crash_out, "c").trials
    assert [t.state for t in failed] == [TrialState.FAIL, TrialState.FAIL]
    reason = failed[0].user_attrs["error"]
    assert "missing.pt" in reason
    last = crashed.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "agecls-train: error: the study stopped: 2 trials failed (more than optuna.max_failures=1); "
        f"most common reason (2 of 2): {reason}; log: "
    )
    assert Path(last.rsplit("log: ", 1)[1]).is_file()


# heavy: about a minute of subprocess sweeps each; the default suite keeps the other resume/requeue checks.
@pytest.mark.heavy
def test_trial_of_a_killed_machine_is_failed_when_stale_and_rerun(tmp_path):
    out = tmp_path / "out"
    args = ["sweep=optuna_optimizers", "optuna.study_name=k", "optuna.n_trials=1", "optuna/pruner=none"]
    args += ["optuna.heartbeat_interval=1", "optuna.grace_period=2"]
    proc = _start_training_sweep(tmp_path, out, args)
    os.killpg(proc.pid, signal.SIGKILL)  # the machine dies: no handler runs, the trial stays RUNNING
    proc.communicate(timeout=60)
    assert _states(_study(out, "k")) == ["RUNNING"]
    time.sleep(3)  # past the grace period

    resumed = _sweep(out, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = _study(out, "k")
    assert _states(study) == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params
    # the dead trial's MLflow run could not end itself; the resumed sweep ended it FAILED
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("optuna_optimizers").experiment_id])
    status = {r.data.tags.get("optuna.trial"): r.info.status for r in runs if "optuna.trial" in r.data.tags}
    assert status == {"0": "FAILED", "1": "FINISHED"}


# heavy: about a minute of subprocess sweeps each; the default suite keeps the other resume/requeue checks.
@pytest.mark.heavy
def test_two_worker_processes_share_one_study(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out)}
    args = ["sweep=optuna_optimizers", "optuna.study_name=w", "optuna.n_trials=3", "optuna/pruner=none"]
    args += ["model.dropout=interval(0.1,0.6)"]  # continuous: fair draws of two workers never coincide
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", *TINY, "trainer.max_epochs=1", *args]
    # The first creates the storage and the MLflow experiment; the second joins while it runs.
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("multiruns/*/*/trial-0000")) and time.monotonic() < deadline:
        time.sleep(0.5)
    second = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    errors = [p.communicate(timeout=600)[1].decode() for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, errors
    trials = _study(out, "w").trials
    states = [t.state.name for t in trials]
    # Each worker stops asking once the study holds n_trials complete or running trials; of two asking at
    # the same instant, the one whose trial came second gives it back unrun (FAIL, marked surplus).
    assert states.count("COMPLETE") == 3, states
    others = [t for t in trials if t.state.name != "COMPLETE"]
    assert all(t.user_attrs["failed_because"].startswith("surplus") for t in others), states
    drawn = [tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE"]
    assert len(set(drawn)) == 3, "the second worker drew other parameters than the first"
    dirs = {p.parent.name for p in out.glob("multiruns/*/*/trial-*")}
    assert len(list(out.glob("multiruns/*/*"))) == 2, "both workers ran trials"
    assert len(dirs) == 2


PRUNERS = sorted(p.stem for p in (CONFIG_DIR / "optuna" / "pruner").glob("*.yaml"))
SAMPLERS = sorted(p.stem for p in (CONFIG_DIR / "optuna" / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml")))
def test_every_sweep_file_accepts_every_pruner_and_sampler(compose_cfg, name):
    for pruner, sampler in zip(PRUNERS, SAMPLERS * len(PRUNERS), strict=False):
        cfg = compose_cfg([f"sweep={name}", f"optuna/pruner={pruner}", f"optuna/sampler={sampler}"])
        assert isinstance(instantiate(cfg.optuna.pruner), optuna.pruners.BasePruner)
        assert isinstance(instantiate(cfg.optuna.sampler), optuna.samplers.BaseSampler)
