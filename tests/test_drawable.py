"""A study checks what it can draw before it opens: every value of its search space validated on top of the
composed config (agecls.sweep.drawable), keys of only some options searched only where they apply, and every
sweep file valid on top of each experiment its header names."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from tests.conftest import compose_train

from agecls.config import CONFIG_DIR, compose
from agecls.errors import UsageError
from agecls.sweep.drawable import check_space
from agecls.sweep.params import present_params
from agecls.sweep.space import search_space
from agecls.training.validation import validate

SWEEPS = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))


def _validate(cfg) -> None:
    validate(cfg, drawn_later=bool((cfg.get("bins") or {}).get("search")))


def _is_group(key: str) -> bool:
    return (CONFIG_DIR / key).is_dir()


def _check(base: list[str], params: dict[str, str]):
    """check_space for `params` (Hydra sweep syntax) on top of the config `base` composes."""
    space, _ = search_space(params, [], OverridesParser.create())
    return check_space(space, lambda lines: compose_train([*base, *lines]), _is_group, _validate)


def test_keys_of_some_options_are_searched_only_where_they_apply(output_dir):
    drawable = _check(
        ["experiment=agecnn", "data.image_size=32"],
        {
            "optimizer": "choice(adam, nadam, rmsprop, sgd)",
            "optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
            "optimizer.momentum": "interval(0.0, 0.95)",
            "optimizer.betas": "choice([0.9,0.999], [0.5,0.999])",
        },
    )
    assert drawable.conditions == {
        "optimizer.momentum": ("optimizer", ["rmsprop", "sgd"]),
        "optimizer.betas": ("optimizer", ["adam", "nadam"]),
    }
    assert list(drawable.always) == ["optimizer", "optimizer.lr"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask(drawable.always)
        drawable.draw_conditional(trial)
        has_momentum = trial.params["optimizer"] in ("rmsprop", "sgd")
        assert ("optimizer.momentum" in trial.params) == has_momentum
        assert ("optimizer.betas" in trial.params) != has_momentum
        study.tell(trial, 0.5)


def test_a_value_no_trial_could_run_is_refused_in_one_line(output_dir):
    with pytest.raises(UsageError) as caught:
        _check(["data.image_size=32"], {"model.blocks": "choice(2, 6)", "optimizer.lr": "interval(1e-3, 1)"})
    message = str(caught.value)
    assert message.startswith("optuna.params: model.blocks=6 can never run: ") and "\n" not in message


def test_a_value_that_runs_beside_another_drawn_value_is_kept(output_dir):
    # InceptionResNetV1 needs 75 px: refused at the base's 64 px, but the study may draw 96
    drawable = _check(
        ["data.image_size=64"],
        {"model": "choice(basic_cnn, inception_resnet_v1)", "data.image_size": "choice(64, 96)"},
    )
    assert drawable.conditions == {}
    with pytest.raises(UsageError, match=r"^optuna.params: model=inception_resnet_v1 can never run: data"):
        _check(["data.image_size=64"], {"model": "choice(basic_cnn, inception_resnet_v1)"})


def test_a_key_of_no_drawn_option_is_refused(output_dir):
    with pytest.raises(UsageError, match=r"^optuna.params: model.width is a key of no option the study"):
        _check([], {"model": "choice(basic_cnn, vgg16)", "model.width": "choice(16, 32)"})


def _named_experiments(sweep: str) -> list[str]:
    lines = (CONFIG_DIR / "sweep" / f"{sweep}.yaml").read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    return sorted(set(re.findall(r"experiment=(\w+)", "\n".join(header))))


def _sweep_params(cfg) -> dict[str, str]:
    """A study's optuna.params, or a grid's hydra.sweeper.params as choices."""
    grid = OmegaConf.select(cfg, "hydra.sweeper.params")
    if grid:
        return {k: f"choice({v})" for k, v in grid.items() if "," in str(v)}
    return present_params(cfg)


CASES = [(s, e) for s in SWEEPS for e in [None, *_named_experiments(s)]]


@pytest.mark.parametrize(("sweep", "experiment"), CASES, ids=lambda v: str(v))
def test_every_sweep_file_draws_only_what_runs_on_the_experiments_it_names(output_dir, sweep, experiment):
    base = [f"sweep={sweep}", *([f"experiment={experiment}"] if experiment else [])]
    params = _sweep_params(compose("train", base, return_hydra_config=True))
    assert params, f"sweep={sweep} searches nothing"
    _check(base, params)


def test_every_sweep_file_names_an_experiment():
    assert [s for s in SWEEPS if not _named_experiments(s)] == []


def test_agecls_train_refuses_such_a_study_before_it_opens(tmp_path):
    env = {**os.environ, "AGECLS_OUTPUT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "agecls.cli.train", "-m", "sweep=optuna_optimizers"]
    cmd += ["model.blocks=choice(6,7)", "data.image_size=32", "tracking=none"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "agecls-train: error: optuna.params: model.blocks=6 can never run: "
        "model.blocks=6 must be between 1 and 5"
    ]
    assert not (tmp_path / "optuna.db").exists(), "refused before the study opened"
