"""The typed configs of the `agecls_optuna` sweeper (ConfigStore: the `optuna` block and `hydra.sweeper`),
and Optuna's private API kept to agecls/study.py."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage, RDBStorage

from agecls.config import CONFIG_DIR
from agecls.sweep.checks import SweepError, check_settings
from agecls.sweep.settings import SETTINGS, OptunaSettings
from hydra_plugins.agecls_sweeper.config import AgeclsOptunaSweeperConf
from hydra_plugins.agecls_sweeper.optuna_sweeper import AgeclsOptunaSweeper

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))


def _type_name(node: DictConfig) -> str:
    """The node's structured-config class, by name: Hydra executes plugin modules afresh when it scans them,
    so the class in its ConfigStore is not the object this test imports."""
    kind = OmegaConf.get_type(node)
    return f"{kind.__module__}.{kind.__qualname__}"


SWEEPER_CONF = f"{AgeclsOptunaSweeperConf.__module__}.{AgeclsOptunaSweeperConf.__qualname__}"


def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_file_composes_with_its_values_in_the_typed_block(output_dir, name):
    cfg = _compose([f"sweep={name}"], hydra=True)
    raw = OmegaConf.load(CONFIG_DIR / "sweep" / f"{name}.yaml")
    if "optuna" not in raw:  # a grid: Hydra's basic sweeper, the block stays as train.yaml has it
        assert OmegaConf.get_type(cfg.optuna) is dict
        assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
        return
    assert OmegaConf.get_type(cfg.optuna) is OptunaSettings
    assert _type_name(cfg.hydra.sweeper) == SWEEPER_CONF
    for key, value in raw.optuna.items():
        if isinstance(value, DictConfig):  # a block merges over train.yaml's: the file's keys win
            assert {k: cfg.optuna[key][k] for k in value} == value, key
        else:
            assert cfg.optuna[key] == value, key
    assert cfg.optuna.n_trials == raw.optuna.n_trials and isinstance(cfg.optuna.n_trials, int)
    # sampler and pruner stay `_target_` blocks of their groups (train.yaml's defaults: tpe, median; a sweep
    # file may choose another pruner, e.g. none where several objectives rule pruners out)
    assert cfg.optuna.sampler._target_ == "optuna.samplers.TPESampler" and cfg.optuna.sampler.seed == 42
    pruner = "median"
    for entry in raw.get("defaults", []):
        if isinstance(entry, DictConfig) and "override /optuna/pruner" in entry:
            pruner = entry["override /optuna/pruner"]
    chosen = OmegaConf.load(CONFIG_DIR / "optuna" / "pruner" / f"{pruner}.yaml")
    assert cfg.optuna.pruner._target_ == chosen._target_
    if pruner == "median":
        assert cfg.optuna.pruner == {
            "_target_": "optuna.pruners.MedianPruner",
            "n_startup_trials": 3,
            "n_warmup_steps": 4,
        }


def test_the_schema_has_exactly_the_keys_of_train_yaml_optuna_block():
    block = OmegaConf.load(CONFIG_DIR / "train.yaml").optuna
    assert set(SETTINGS) == {*block, "sampler", "pruner"}  # sampler, pruner: groups optuna/sampler, /pruner
    assert len(SETTINGS) == 26


def test_misspelled_optuna_key_on_the_command_line_is_an_error_naming_it(output_dir):
    with pytest.raises(ConfigCompositionException) as raised:
        _compose(["sweep=optuna_bins", "optuna.n_trails=8"])
    assert "Could not override 'optuna.n_trails'" in str(raised.value)
    assert "Key 'n_trails' not in 'OptunaSettings'" in str(raised.value.__cause__)
    with pytest.raises(ConfigCompositionException) as raised:
        _compose(["sweep=optuna_bins", "optuna.n_trials=many"])
    cause = str(raised.value.__cause__)
    assert "'many' of type 'str' could not be converted to Integer" in cause
    assert "full_key: optuna.n_trials" in cause


def test_misspelled_optuna_key_in_a_sweep_file_is_an_error_naming_file_and_key(output_dir, tmp_path):
    (tmp_path / "sweep").mkdir()
    text = (CONFIG_DIR / "sweep" / "optuna_bins.yaml").read_text().replace("n_trials: 12", "n_trails: 12")
    assert "n_trails: 12" in text
    (tmp_path / "sweep" / "typo.yaml").write_text(text)
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    assert _compose(["sweep=optuna_bins", searchpath]).optuna.n_trials == 12  # the search path works
    with pytest.raises(ConfigCompositionException) as raised:
        _compose(["sweep=typo", searchpath])
    message = str(raised.value)
    assert "In 'sweep/typo'" in message and "Key 'n_trails' not in 'OptunaSettings'" in message
    assert "full_key: optuna.n_trails" in message


def test_key_added_past_the_schema_with_plus_is_named_with_the_closest_setting(output_dir):
    cfg = _compose(["sweep=optuna_bins", "+optuna.n_trails=8"])  # `+` inserts regardless of the schema
    assert cfg.optuna.n_trails == 8 and cfg.optuna.n_trials == 12
    with pytest.raises(SweepError, match=r"^optuna\.n_trails: .*; did you mean optuna\.n_trials\? valid: "):
        check_settings(cfg.optuna)
    with pytest.raises(SweepError) as raised:
        check_settings(_compose(["sweep=optuna_bins", "+optuna.zzz=1"]).optuna)
    assert "did you mean" not in str(raised.value) and f"valid: {', '.join(SETTINGS)}" in str(raised.value)
    check_settings(_compose(["sweep=optuna_bins"]).optuna)  # the shipped block passes


def test_agecls_train_stops_on_the_misspelled_key_before_opening_the_study(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", "sweep=optuna_bins", "+optuna.n_trails=8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]  # a configuration error: one line, exit 2
    assert "optuna.n_trails: not a setting of an Optuna study; did you mean optuna.n_trials?" in done.stderr
    assert not (out / "optuna.db").exists(), "no study was opened"


def test_hydra_sweeper_node_is_typed_and_carries_only_its_target(output_dir):
    cfg = _compose(["sweep=optuna_bins"], hydra=True)
    assert _type_name(cfg.hydra.sweeper) == SWEEPER_CONF
    assert OmegaConf.to_container(cfg.hydra.sweeper) == {
        "_target_": "hydra_plugins.agecls_sweeper.optuna_sweeper.AgeclsOptunaSweeper"
    }
    sweeper = instantiate(cfg.hydra.sweeper)  # as Hydra does: the node's keys but _target_ are its arguments
    assert type(sweeper).__qualname__ == AgeclsOptunaSweeper.__qualname__ and sweeper.config is None
    with pytest.raises(ConfigCompositionException) as raised:
        _compose(["sweep=optuna_bins", "hydra.sweeper.n_trials=8"], hydra=True)  # hydra-optuna-sweeper's key
    assert "Key 'n_trials' not in 'AgeclsOptunaSweeperConf'" in str(raised.value.__cause__)


# -- Optuna's private API: only agecls/study.py --------------------------------------------------------------
def _optuna_internal_names() -> set[str]:
    """Private attributes of Optuna's study, trial and storage objects, and the methods of its storages
    (BaseStorage and the heartbeat interface RDBStorage adds: "not supposed to be directly accessed by
    library users")."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    objects = [
        study,
        trial,
        study.trials[0],
        storage,
        optuna.Study,
        optuna.Trial,
        BaseStorage,
        RDBStorage,
    ]
    names: set[str] = set()
    for obj in objects:
        names |= {n for n in {*dir(obj), *vars(obj)} if n.startswith("_") and not n.startswith("__")}
    user = {*dir(optuna.Study), *dir(optuna.Trial), *dir(optuna.trial.FrozenTrial)}
    names |= {n for n in {*dir(BaseStorage), *dir(RDBStorage)} if not n.startswith("_")} - user
    return names


def _private_module(dotted: str) -> bool:
    """optuna.storages._heartbeat and the like: a module path of Optuna with a private part."""
    parts = dotted.split(".")
    return parts[0] == "optuna" and any(p.startswith("_") and not p.startswith("__") for p in parts)


def _internal_uses(path: Path, names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        text = ""
        if isinstance(node, ast.Attribute):
            chain, owner = ast.unparse(node), ast.unparse(node.value)
            if (node.attr in names and owner not in ("self", "cls")) or _private_module(chain):
                text = chain
        elif isinstance(node, ast.ImportFrom | ast.Import):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(_private_module(m) for m in modules):
                text = ast.unparse(node)
        if text:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    return found


def test_only_agecls_study_touches_optunas_private_api():
    names = _optuna_internal_names()
    assert {
        "_storage",
        "_trial_id",
        "_study_id",
        "_get_stale_trial_ids",
        "record_heartbeat",
        "get_trial",
    } <= names
    study_py = ROOT / "src" / "agecls" / "study.py"
    files = [
        *(ROOT / "src").rglob("*.py"),
        *(ROOT / "bench").rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
    ]
    offenders = [use for path in sorted(files) if path != study_py for use in _internal_uses(path, names)]
    assert offenders == []
    # the same check finds study.py's wrappers, each documented there with its reason
    found = sorted(use.split(": ", 1)[1] for use in _internal_uses(study_py, names))
    assert sorted(set(found)) == [
        "PatientStorage.set_trial_state_values",  # the proxy's finishing call is _finish_once
        "from optuna.storages._heartbeat import BaseHeartbeat",  # patient_storage: the stale-trial check
        "from optuna.storages._rdb import models",  # set_finished_attrs: attrs on a finished trial
        "from optuna.storages._rdb.storage import _create_scoped_session",
        "self.inner.set_trial_state_values",  # _finish_once: a finishing call that landed, its answer lost
        "study._storage",
        "study._storage.record_heartbeat",
        "trial._trial_id",
    ]


@pytest.mark.parametrize("experiment", ["agecnn", "gendercnn", "ethnicitycnn"])
def test_one_recipe_sweep_file_serves_every_task_its_head_searched_for_age_only(output_dir, experiment):
    from agecls.config import check_overrides
    from agecls.sweep.params import present_params

    lines = [f"experiment={experiment}", "sweep=optuna_recipe", "data=synthetic"]
    cfg = check_overrides("train", lines, multirun=True)  # the command line's check: no unknown key
    params = present_params(cfg)
    assert ("task.head" in params) == (experiment == "agecnn")
    assert set(cfg.optuna.params) - set(params) <= {"task.head"}


def test_an_optional_param_the_space_does_not_search_is_refused_naming_the_closest(output_dir):
    from agecls.config import check_overrides
    from agecls.errors import UsageError
    from agecls.sweep.params import check_params

    lines = ["experiment=gendercnn", "sweep=optuna_recipe", "optuna.optional_params=[task.haed]"]
    with pytest.raises(
        UsageError,
        match=r"^optuna.optional_params: task.haed is not a key of optuna.params; "
        r"did you mean task.head\? valid: callbacks.ema.enabled, ",
    ):
        check_params(check_overrides("train", lines, multirun=True))
