"""Every config file composes into a config the training code can read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from agecls.config import CONFIG_DIR
from agecls.data.bins import AgeBins, BinsError

GROUPS = [
    "data",
    "bins",
    "augment",
    "sampler",
    "model",
    "optimizer",
    "scheduler",
    "task",
    "trainer",
    "tracking",
    "hierarchy",
]
GROUP_FILES = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]
OVERLAYS = [(g, p.stem) for g in ("experiment", "sweep") for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]
REQUIRED = {"data": ["data.root=/tmp/x"], "experiment": ["data.root=/tmp/x"]}


@pytest.mark.parametrize(("group", "name"), GROUP_FILES + OVERLAYS, ids=lambda v: str(v))
def test_every_group_file_composes_and_resolves(compose_cfg, group, name):
    extra = REQUIRED.get(group, []) if name == "utkface" else []
    cfg = compose_cfg([f"{group}={name}", *extra])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["seed"] == 42
    for key in GROUPS + ["paths", "objective"]:
        assert key in resolved, f"{group}={name} lost the {key} group"


def test_defaults_are_the_walking_skeleton(compose_cfg, output_dir):
    cfg = compose_cfg()
    assert (cfg.data.name, cfg.bins.name, cfg.augment.name, cfg.sampler.name) == (
        "synthetic",
        "seed7",
        "none",
        "none",
    )
    assert (cfg.model.name, cfg.optimizer._target_, cfg.scheduler.name, cfg.task.name) == (
        "basic_cnn",
        "torch.optim.Adam",
        "none",
        "age",
    )
    assert AgeBins.from_config(cfg.bins).labels == ["0-2", "3-6", "7-14", "15-30", "31-40", "41-65", "66-116"]
    assert Path(cfg.paths.output_dir) == output_dir
    assert cfg.tracking.tracking_uri == f"sqlite:///{output_dir}/mlflow.db"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "bins").glob("*.yaml")))
def test_every_bin_set_is_valid(compose_cfg, name):
    if name == "search":  # drawn per Optuna trial (tests/test_bin_search.py)
        with pytest.raises(BinsError, match="sweep=optuna_bin_edges"):
            AgeBins.from_config(compose_cfg([f"bins={name}"]).bins)
        return
    bins = AgeBins.from_config(compose_cfg([f"bins={name}"]).bins)
    assert bins.index([0, 116]).tolist() == [0, bins.n - 1]


def test_utkface_requires_a_root(compose_cfg):
    cfg = compose_cfg(["data=utkface"])
    with pytest.raises(Exception, match="root"):
        _ = cfg.data.root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agecls.cli.train", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


def test_cli_cfg_job_and_help_from_any_directory(output_dir):
    shown = _cli("model=basic_cnn", "model.blocks=3", "optimizer=nadam", "optimizer.lr=1e-3", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    cfg = OmegaConf.create(shown.stdout)
    assert (
        cfg.model.blocks == 3 and cfg.optimizer._target_ == "torch.optim.NAdam" and cfg.optimizer.lr == 1e-3
    )
    helped = _cli("--help")
    assert helped.returncode == 0, helped.stderr
    assert "== Configuration groups ==" in helped.stdout and "optimizer: adadelta, adam" in helped.stdout


def test_unknown_override_is_a_clear_error(output_dir):
    bad = _cli("optimizer=adamm", "--cfg", "job")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("agecls-train: error: optimizer=adamm: no option 'adamm' in group optimizer")
    valid = "adadelta, adam, adamax, adamw, nadam, rmsprop, sgd"
    assert f"did you mean optimizer=adam? (valid: {valid})" in bad.stderr
