"""Every agecls command is called one way: Hydra overrides of its own config, `--cfg job`, `--help`; an
unknown key or a misspelt group option is an error (exit code 2) that names the closest valid one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from agecls.cli import app as cli_app
from agecls.cli import bins, compare, data, eval, predict, register, report, serve
from agecls.cli import train as cli_train
from agecls.config import CONFIG_DIR, check_overrides, compose_train
from agecls.errors import AgeclsError, UsageError
from agecls.sweep.params import check_params

APPS = {m.APP.prog: m for m in (bins, compare, data, eval, predict, register, report, serve)}
BIN = Path(sys.executable).parent


def _group_options(group: str) -> list[str]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.object_type import ObjectType

        loader = GlobalHydra.instance().config_loader()
        return list(loader.get_group_options(group, results_filter=ObjectType.CONFIG))


def defaults_entries() -> list[tuple[str, str, str]]:
    """(file, entry as written, group) for every group entry of every defaults list under conf/."""
    entries = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults") or []:
            if not isinstance(entry, dict):
                continue  # `_self_`, or a config of the file's own group (`- synthetic`)
            (written,) = entry
            name = written.split()[-1]  # `optional x`, `override /x`
            folder = path.parent.relative_to(CONFIG_DIR).as_posix()
            group = name.lstrip("/") if name.startswith("/") or folder == "." else f"{folder}/{name}"
            entries.append((path.relative_to(CONFIG_DIR).as_posix(), written, group))
    return entries


ENTRIES = defaults_entries()
GROUPS = sorted({group for _, _, group in ENTRIES} | {"hydra/launcher"})


def misspelt(group: str) -> tuple[str, str]:
    """(an option of `group`, that option misspelt)."""
    good = _group_options(group)[0]
    return good, good[:-1] + good[-1] * 2 + "x"


def test_the_walk_finds_every_group_of_the_train_config():
    assert {"experiment", "sweep", "model", "optuna/pruner", "hydra/sweeper", "callbacks"} <= set(GROUPS)
    assert ("train.yaml", "experiment", "experiment") in ENTRIES and (
        "train.yaml",
        "sweep",
        "sweep",
    ) in ENTRIES


def test_no_defaults_entry_is_optional():
    """Hydra skips an `optional` entry whose option does not exist, silently: `agecls-train
    experiment=agecnnn` ran the defaults. No entry may be optional, so that Hydra itself refuses a misspelling
    (bench scripts compose with Hydra directly); `null` leaves a group empty until an option is named."""
    optional = [f"{where}: {written}" for where, written, _ in ENTRIES if written.startswith("optional")]
    assert optional == []


@pytest.mark.parametrize("group", GROUPS)
def test_no_group_skips_a_misspelt_option(output_dir, group):
    good, bad = misspelt(group)
    with (
        initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"),
        pytest.raises(MissingConfigException, match=f"Could not find '{group}/{bad}'"),
    ):
        compose("train", overrides=[f"{group}={bad}"])
    with pytest.raises(UsageError, match=f"did you mean {group}={good}\\?") as caught:
        compose_train([f"{group}={bad}"])
    assert caught.value.exit_code == 2 and f"(valid: {', '.join(_group_options(group))})" in str(caught.value)


@pytest.mark.parametrize("group", GROUPS)
def test_agecls_train_misspelt_option_of_every_group_exits_2_naming_the_closest(
    output_dir, monkeypatch, capsys, group
):
    good, bad = misspelt(group)
    for argv in (["--cfg", "job", f"{group}={bad}"], [f"{group}={bad}"], ["-m", f"{group}={good},{bad}"]):
        monkeypatch.setattr(sys, "argv", ["agecls-train", *argv])
        with pytest.raises(SystemExit) as exited:
            cli_train.main()
        assert exited.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"agecls-train: error: {group}={bad}: no option {bad!r} in group {group}; ")
        assert f"did you mean {group}={good}?" in err and err.count("\n") == 1


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(tmp_path / "out")}
    return subprocess.run(
        [str(BIN / "agecls-train"), *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cfg", "job", "experiment=agecnnn"], "did you mean experiment=agecnn?"),
        (["experiment=agecnnn", "trainer.max_epochs=1"], "did you mean experiment=agecnn?"),
        (["-m", "sweep=optuna_optimizerss"], "did you mean sweep=optuna_optimizers?"),
        (["-m", "model=resnet50,resnt50"], "did you mean model=resnet50?"),
        (["optuna/pruner=medain"], "did you mean optuna/pruner=median?"),
        (
            ["optimizer.lrr=1e-3"],
            "unknown key 'optimizer.lrr'; did you mean optimizer.lr? (keys of optimizer:",
        ),
        (["-m", "optimizer.lrr=tag(log, interval(1e-4, 1e-2))"], "did you mean optimizer.lr?"),
        (["modle=resnet50"], "unknown key 'modle'; did you mean model?"),
        (
            ["optuna.pruner=median"],
            "optuna/pruner is a config group; choose an option with optuna/pruner=median",
        ),
        (["hydra.run.dirr=x"], "unknown key 'hydra.run.dirr'; did you mean hydra.run.dir?"),
        (["trainer.max_epochs=1,2"], "sweeps several values, which only a -m (--multirun) run does"),
        (["+seed=1"], "+seed=1: seed is already set; change it with seed=... (no +)"),
        (["model.blocks=["], "cannot parse 'model.blocks=['"),
    ],
)
def test_agecls_train_bad_overrides_are_one_line_errors_before_anything_runs(tmp_path, args, message):
    done = _train(tmp_path, *args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("agecls-train: error: ") and done.stderr.count("\n") == 1
    assert message in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()  # no data generated, no run folder, no study


def test_agecls_train_valid_command_lines_still_compose(tmp_path):
    shown = _train(tmp_path, "--cfg", "job", "experiment=agecnn", "+extra.key=1", "hydra.run.dir=/tmp/x")
    assert shown.returncode == 0, shown.stderr
    cfg = OmegaConf.create(shown.stdout)
    assert cfg.extra.key == 1 and cfg.model.name == "basic_cnn" and cfg.data.image_size == 224
    # A run's saved config, re-run from its folder (--config-path/--config-name, as docs/SWEEPS.md shows).
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "config.yaml").write_text(shown.stdout)
    again = _train(
        tmp_path, "--config-path", str(tmp_path / "trial"), "--config-name", "config", "--cfg", "job"
    )
    assert again.returncode == 0, again.stderr
    assert OmegaConf.create(again.stdout) == cfg
    bad = _train(tmp_path, "--config-path", str(tmp_path / "trial"), "--config-name", "config", "seedd=1")
    assert bad.returncode == 2 and "unknown key 'seedd'; did you mean seed?" in bad.stderr
    # --config-dir adds a search path: its options are options (here a model of one's own).
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "mine.yaml").write_text(
        (CONFIG_DIR / "model" / "basic_cnn.yaml").read_text()
    )
    own = _train(
        tmp_path, "--config-dir", str(tmp_path / "mine"), "--cfg", "job", "model=mine", "model.blocks=2"
    )
    assert own.returncode == 0 and OmegaConf.create(own.stdout).model.blocks == 2, own.stderr


HEAVY = ("torch", "lightning", "pandas", "mlflow", "optuna")


def test_agecls_train_help_is_what_it_does_then_the_groups_without_composing_a_config(tmp_path):
    """--help reads the help text and lists the groups from the config folder: no config is composed, so
    nothing heavy is imported; the full config is behind --cfg job."""
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(tmp_path / "out")}
    helped = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "agecls-train"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in helped.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "hydra" in imported and not imported & set(HEAVY)
    text = helped.stdout
    shipped = yaml.safe_load((CONFIG_DIR / "hydra" / "default.yaml").read_text())["help"]
    assert text.startswith(shipped["header"] + "\n\n== Configuration groups ==\n")
    assert text.endswith("\n" + shipped["footer"] + "\n")
    head, _, rest = text.partition("== Configuration groups ==")
    assert head.count("\n  agecls-train ") == 4
    groups, _, config = rest.partition("\n== Config ==\n")
    assert "experiment: agecnn, demo" in groups and "optuna/pruner: hyperband, median" in groups
    listed = groups.split("\nexperiment: ")[1].splitlines()
    assert "v13, v15" in listed[0] and listed[1:3] == [  # where the list lacks v14, it says why
        "  (v01-v20: the dissertation's trail, docs/DISSERTATION.md; no v14 on purpose:",
        "  its hierarchy's age experts saw validation faces, the leak that v15 fixes)",
    ]
    assert "hydra/" not in groups and "--cfg job" in config and "seed: 42" not in text
    assert _train(tmp_path, "-h").stdout == text


def test_the_help_lists_the_groups_as_hydra_does(monkeypatch, capsys, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        from hydra.core.global_hydra import GlobalHydra

        hydras = GlobalHydra.instance().hydra.format_config_groups(lambda g: g.split("/")[0] != "hydra")
    listed = cli_train.config_groups(CONFIG_DIR)
    assert "".join(f"{group}: {', '.join(options)}\n" for group, options in listed.items()) == hydras
    (tmp_path / "model").mkdir()  # --config-dir adds its options, as Hydra's search path does
    (tmp_path / "model" / "mine.yaml").write_text("name: basic_cnn\n")
    monkeypatch.setattr(sys, "argv", ["agecls-train", "--config-dir", str(tmp_path), "--help"])
    cli_train.main()
    shown = capsys.readouterr().out
    assert f"model: {', '.join(sorted([*listed['model'], 'mine']))}\n" in shown


def test_agecls_train_hydra_help_stays_hydras(tmp_path):
    helped = _train(tmp_path, "--hydra-help")
    assert helped.returncode == 0 and "== Flags ==" in helped.stdout, helped.stderr[-2000:]


def test_multirun_sweeps_are_checked_value_by_value(output_dir):
    cfg = check_overrides(
        "train", ["model=basic_cnn,resnet50", "optimizer.lr=interval(1e-4,1e-2)"], multirun=True
    )
    assert cfg.model.name == "basic_cnn" and "hydra" in cfg  # composed with each sweep's first value
    assert check_overrides("train", ["model=glob(*cnn)", "sweep=demo", "experiment=demo"], multirun=True)
    with pytest.raises(UsageError, match="did you mean model.blocks"):
        check_overrides("train", ["model.blockss=range(2,4)"], multirun=True)
    with pytest.raises(
        UsageError, match=r"optuna.params: optimizer=nadamm: .* did you mean optimizer=nadam\?"
    ):
        study_params(["sweep=demo", 'optuna.params={optimizer: "choice(adam, nadamm)"}'])
    with pytest.raises(
        UsageError, match=r"optuna.params: unknown key 'model.blcks'; did you mean model.blocks\?"
    ):
        study_params(["sweep=demo", '++optuna.params={model.blcks: "range(2,4)"}'])
    with pytest.raises(
        UsageError, match=r"optuna.params has no key 'model.blcks' \(its keys: none\); \+\+opt"
    ):
        study_params(['optuna.params={model.blcks: "range(2,4)"}'])


def study_params(overrides: list[str]) -> None:
    """What `agecls-train -m OVERRIDES` checks of a study's search space before it starts."""
    check_params(check_overrides("train", overrides, multirun=True))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml")))
def test_every_sweep_file_names_existing_keys_and_options(output_dir, name):
    study_params([f"sweep={name}"])


# -- the other commands ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prog", sorted(APPS))
def test_help_opens_with_a_description_and_examples_then_the_config(prog, capsys):
    module = APPS[prog]
    assert module.main(["--help"]) == 0
    text = capsys.readouterr().out
    first, examples, config = (
        text.index(f"{prog}: "),
        text.index("\nexamples:\n"),
        text.index("\n== Config ("),
    )
    assert first == 0 and examples < config
    listed = text[examples + 1 :].split("\n\n")[0].splitlines()[1:]
    assert 2 <= len(listed) <= 4 and all(line.startswith(f"  {prog} ") for line in listed)
    assert (
        CONFIG_DIR / f"{module.APP.config}.yaml"
    ).read_text().rstrip() in text and "exit codes: 0 " in text
    assert module.main(["-h"]) == 0 and capsys.readouterr().out == text


@pytest.mark.parametrize("prog", sorted(APPS))
def test_cfg_job_prints_the_composed_config(output_dir, prog, capsys):
    module = APPS[prog]
    assert module.main(["--cfg", "job"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    own = yaml.safe_load((CONFIG_DIR / f"{module.APP.config}.yaml").read_text())
    own.pop("defaults", None)
    assert {k: shown[k] for k in own} == own
    if prog == "agecls-data":  # the train config with its two keys
        assert shown["model"]["name"] == "basic_cnn" and "hydra" not in shown


@pytest.mark.parametrize(
    ("prog", "argv", "message"),
    [
        ("agecls-eval", ["ckpt=a", "data.root=b", "eval.bacth_size=3"], "did you mean eval.batch_size?"),
        (
            "agecls-eval",
            ["ckpt=a", "data.rot=b"],
            "unknown key 'data.rot'; did you mean data.root? (keys of data: root)",
        ),
        ("agecls-eval", ["ckpt=a", "data.root=b", "hydra.run.dir=x"], "hydra.* keys do not apply"),
        ("agecls-eval", ["ckpt=a", "data.root=b", "tracking=none"], "tracking is not a config group of eval"),
        ("agecls-predict", ["ckpt=a", "imgs=b"], "unknown key 'imgs'; did you mean images?"),
        ("agecls-predict", ["ckpt=a", "images=b", "+extra=1"], "only plain key=value is supported"),
        ("agecls-serve", ["ckpt=a", "prot=80"], "unknown key 'prot'; did you mean port?"),
        ("agecls-serve", ["ckpt=a", "port=0"], "port=0: valid: a whole number from 1 to 65535"),
        ("agecls-serve", ["ckpt=a", "images=x"], "unknown key 'images'"),
        ("agecls-bins", ["propose", "run=x", "k=4", "min_cout=3"], "did you mean min_count?"),
        ("agecls-report", ["demo", "stroage=x"], "unknown key 'stroage'; did you mean storage?"),
        ("agecls-report", [], "name=... is required"),
        ("agecls-compare", ["A", "B", "nboot=3"], "did you mean n_boot?"),
        ("agecls-compare", ["A", "B", "--nboot", "3"], "unexpected argument '--nboot'"),
        ("agecls-compare", ["A", "B", "--split"], "--split needs a value"),
        ("agecls-data", ["show", "modle=resnet50"], "unknown key 'modle'; did you mean model?"),
        ("agecls-data", ["prepare", "bins=fuor"], "did you mean bins=four?"),
        (
            "agecls-data",
            ["--cfg", "hydra"],
            "--cfg hydra: agecls-data prints its composed config with --cfg job",
        ),
    ],
)
def test_bad_arguments_exit_2_naming_the_closest_key(output_dir, capsys, prog, argv, message):
    assert APPS[prog].main(argv) == 2
    err = capsys.readouterr().err
    usage, error = err.splitlines()
    assert usage.startswith(f"usage: {prog} ") and error.startswith(f"{prog}: error: ")
    assert message in error


@pytest.mark.parametrize(
    ("prog", "argv", "expected"),
    [
        (
            "agecls-report",
            ["demo", "--out", "r", "--tracking-uri=sqlite:///x.db"],
            {"name": "demo", "out": "r"},
        ),
        ("agecls-report", ["2024"], {"name": "2024"}),  # a name stays text
        ("agecls-compare", ["A", "B", "--split", "test", "--n-boot", "50"], {"run_b": "B", "n_boot": 50}),
        ("agecls-compare", ["run a", "B", "--json", "r.json", "--seed=3"], {"run_a": "run a", "seed": 3}),
        (
            "agecls-data",
            ["show", "--manifest", "m.csv", "bins=three"],
            {"command": "show", "manifest": "m.csv"},
        ),
        (
            "agecls-bins",
            ["propose", "run=1e10", "k=4", "--install"],
            {"run": "1e10", "k": 4, "install": True},
        ),
        (
            "agecls-bins",
            ["propose", "run=x", "k=4", "install=true", "fixed_edges=[18,65]"],
            {"fixed_edges": [18, 65]},
        ),
        ("agecls-serve", ["ckpt=a", "host=0.0.0.0", "port=9000"], {"host": "0.0.0.0", "port": 9000}),
        ("agecls-eval", ["ckpt=[a,b]", "data.root=d"], {"ckpt": ["a", "b"]}),
    ],
)
def test_documented_shorthands_map_to_keys(output_dir, prog, argv, expected):
    module = APPS[prog]
    command = cli_app.parse_argv(module.APP, argv)
    cfg = OmegaConf.to_container(cli_app.compose_app(module.APP, command.overrides))
    assert {k: cfg[k] for k in expected} == expected


def test_one_error_mapping(capsys):
    from omegaconf.errors import ConfigKeyError

    cases = [
        (UsageError("k=1: valid: a whole number >= 2"), 2),
        (AgeclsError("no MLflow experiment named 'x'"), 1),
        (ValueError("data.root=/x: no such folder"), 1),
        (FileNotFoundError("gone.csv"), 1),
        (ConfigKeyError("missing key"), 2),
        (InterpolationResolutionError("bad ${x}"), 2),
    ]
    for exc, code in cases:
        assert cli_app.report("agecls-x", exc, usage="agecls-x KEY=VALUE") == code
        err = capsys.readouterr().err
        assert err.endswith(f"agecls-x: error: {exc}\n") and err.startswith("usage: ") == (code == 2)
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        cli_app.report("agecls-x", RuntimeError("bug"))


def test_the_defaults_that_left_python_match_what_the_library_uses():
    from agecls.serving.predict import DEFAULT_MAX_PIXELS

    faces = yaml.safe_load((CONFIG_DIR / "predict.yaml").read_text())
    served = yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())
    assert faces["max_pixels"] == DEFAULT_MAX_PIXELS
    shared = set(faces) - {"images", "out", "grid"}
    assert {k: served[k] for k in shared} == {k: faces[k] for k in shared}
    assert set(served) - shared == {
        "host",
        "port",
        "max_upload_mb",
        "max_batch",
        "max_concurrent",
        "max_queue",
        "max_wait_s",
        "max_decoded_pixels",
    }


def test_command_modules_import_no_heavy_library():
    """--help stays quick: no command imports torch, lightning, mlflow, optuna or pandas before it runs."""
    modules = ", ".join(
        f"agecls.cli.{m}"
        for m in ("train", "data", "eval", "predict", "serve", "report", "compare", "bins", "register")
    )
    heavy = ("torch", "lightning", "mlflow", "optuna", "pandas")
    probe = f"import sys, {modules}; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


# -- agecls-train: one check per process, exit codes from agecls.cli only -----------------------------------


def _main_exit(monkeypatch, argv: list[str]) -> int | str | None:
    monkeypatch.setattr(sys, "argv", ["agecls-train", *argv])
    try:
        cli_train.main()
    except SystemExit as exited:
        return exited.code
    return 0


def test_a_single_run_is_composed_by_hydra_and_validated_once(output_dir, tmp_path, monkeypatch):
    """The precheck validates the run's config before Hydra starts; train() is told so rather than
    validating it again. A study's trial, launched with overrides its sweeper checked, skips the precheck."""
    import agecls.training.task as task
    import agecls.training.validation as validation

    calls, given = [], []
    real = validation.validate
    monkeypatch.setattr(validation, "validate", lambda cfg, **kw: calls.append(kw) or real(cfg, **kw))
    monkeypatch.setattr(task, "run_task", lambda cfg, validated=None: given.append(validated) or 0.5)
    run = ["trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]
    assert _main_exit(monkeypatch, run) == 0
    assert len(calls) == 1 and given == [[]]  # its warnings (none here) stand for train()'s own check

    def refuse(argv):
        raise AssertionError("a trial's command line is checked by its sweeper")

    monkeypatch.setattr(cli_train, "precheck", refuse)
    assert _main_exit(monkeypatch, [*run, "optuna.trial=3"]) == 0
    assert len(calls) == 1 and given[-1] is None  # train() validates what the trial drew


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [
        (UsageError("optuna.n_jobs=0: valid: a whole number >= 1"), 2, "optuna.n_jobs=0: valid: "),
        (KeyboardInterrupt(), 130, None),
        (RuntimeError("a bug"), 1, "RuntimeError: a bug"),  # Hydra's report of anything else, as before
    ],
)
def test_a_study_s_usage_error_and_ctrl_c_become_exit_codes(
    output_dir, tmp_path, monkeypatch, capsys, raised, code, message
):
    from agecls.sweep import sweeper

    def sweep(self, arguments):
        raise raised

    monkeypatch.setattr(sweeper.StudyRunner, "sweep", sweep)
    argv = ["-m", "sweep=demo", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert _main_exit(monkeypatch, argv) == code
    err = capsys.readouterr().err
    if code == 2:
        assert err == f"agecls-train: error: {raised}\n"
    elif message:
        assert message in err and "Traceback" in err
    else:
        assert "Traceback" not in err
