"""Validate first: every configuration error of `agecls-train` is one line and exit code 2, given before any
data is prepared, any run folder is made or any MLflow run opens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agecls.cli import train as cli_train
from agecls.config import CONFIG_DIR, compose_train
from agecls.models.limits import min_image_size
from agecls.training.validation import ConfigValueError, check_added_keys, validate

# (override lines, the exact one-line message after "agecls-train: error: ")
BAD = [
    (["optimizer.lr=-1"], "optimizer.lr=-1: must be > 0"),
    (["optimizer=sgd", "optimizer.momentum=1"], "optimizer.momentum=1: must be in [0, 1)"),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas=[0.9,1.0]: must be two numbers in [0, 1)"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: must be >= 0"),
    (
        ["+optimizer.momentm=0.9"],
        "optimizer.momentm=0.9: not an argument of Adam (valid: lr, betas, eps, weight_decay, amsgrad, "
        "foreach, maximize, capturable, differentiable, fused, decoupled_weight_decay)",
    ),
    (["scheduler=onecycle", "scheduler.params.max_lr=0"], "scheduler.params.max_lr=0: must be > 0"),
    (["scheduler=plateau", "scheduler.params.factor=1.5"], "scheduler.params.factor=1.5: must be in (0, 1)"),
    (
        ["scheduler=plateau", "scheduler.params.patience=-1"],
        "scheduler.params.patience=-1: must be a whole number >= 0",
    ),
    (["scheduler=cosine", "scheduler.params.eta_min=-1"], "scheduler.params.eta_min=-1: must be >= 0"),
    (
        ["data.image_size=0"],
        "data.image_size=0: model 'basic_cnn' needs a whole number >= 16 "
        "(model.blocks=4 max-pools of 2 need a multiple of 16)",
    ),
    (
        ["data.image_size=8"],
        "data.image_size=8: model 'basic_cnn' needs a whole number >= 16 "
        "(model.blocks=4 max-pools of 2 need a multiple of 16)",
    ),
    (
        ["model=resnet50", "data.image_size=16"],
        "data.image_size=16: model 'resnet50' needs a whole number >= 32 "
        "(its total stride is 32, so the last feature map is 1x1 at 32 px)",
    ),
    (["data.batch_size=0"], "data.batch_size=0: must be a whole number >= 1"),
    (
        ["trainer.max_epochs=0"],
        "trainer.max_epochs=0: must be a whole number >= 1 (the epochs the run trains)",
    ),
    (
        ["trainer.max_epochs=2", "trainer.min_epochs=3"],
        "trainer.min_epochs=3: must be <= trainer.max_epochs=2",
    ),
    (
        ["bins.ranges=[[0,10],[12,116]]"],
        "bins.ranges=[[0,10],[12,116]]: gap between [0, 10] and [12, 116] (ages 11..11 belong to no bin)",
    ),
    (["bins.ranges=[[0,10],[8,116]]"], "bins.ranges=[[0,10],[8,116]]: range #1 [8, 116] overlaps [0, 10]"),
    (
        ["bins.ranges=[[0,10],[11,20]]"],
        "bins.ranges=[[0,10],[11,20]]: cover 0..20 but must cover 0..116 "
        "(first range [0, 10], last range [11, 20])",
    ),
    (
        ["task.head=coral", "sampler=inverse_loss"],
        "sampler.class_weights=inverse_freq weighs the cross-entropy of classification heads; "
        "task.head=coral has none (use sampler.class_weights=none, or sampler=weighted)",
    ),
    (
        ["+ckpt_path=best.ckpt"],
        "+ckpt_path=best.ckpt: no code reads ckpt_path, so it would only be stored in config.yaml "
        "(top-level keys: augment, bins, callbacks, data, hierarchy, model, objective, optimizer, optuna, "
        "paths, sampler, scheduler, seed, task, tracking, trainer)",
    ),
    (
        ["+model.blcks=3"],
        "model.blcks: model 'basic_cnn' has no such key; did you mean model.blocks? (its keys: blocks, "
        "base_channels, hidden, dropout, dropout_at, input_norm, freeze, weights, weights_prefix, "
        "strict_weights)",
    ),
    (
        ["+callbacks.early_stopping.patiense=1"],
        "callbacks.early_stopping.patiense=1: not an argument of EarlyStopping; did you mean "
        "callbacks.early_stopping.patience? (valid: monitor, min_delta, patience, verbose, mode, strict, "
        "check_finite, stopping_threshold, divergence_threshold, check_on_train_epoch_end, "
        "log_rank_zero_only, enabled)",
    ),
    (
        ["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true"],
        "optimizer (SGD): Nesterov momentum requires a momentum and zero dampening",
    ),
    (["data=utkface"], "data.root=???: a value is required (give it as data.root=...)"),
    (
        ["callbacks.swa.enabled=true", "callbacks.ema.enabled=true"],
        "callbacks.ema.enabled=true and callbacks.swa.enabled=true: two weight averages of one run; "
        "valid: enable one of them",
    ),
    (
        ["hierarchy=gender", 'hierarchy.expert_overrides=["trainer.max_epochs=0"]'],
        "hierarchy stage expert-male: trainer.max_epochs=0: must be a whole number >= 1 "
        "(the epochs the run trains)",
    ),
    (["optimizer.lrr=1e-3"], "unknown key 'optimizer.lrr'; did you mean optimizer.lr? (keys of optimizer: "),
]


def _main(monkeypatch, capsys, out: Path, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("AGECLS_OUTPUT_DIR", str(out))
    monkeypatch.setattr(sys, "argv", ["agecls-train", *argv])
    with pytest.raises(SystemExit) as exited:
        cli_train.main()
    captured = capsys.readouterr()
    assert captured.out == ""
    return exited.value.code, captured.err


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_value_is_one_line_and_exit_2_before_anything_runs(
    tmp_path, monkeypatch, capsys, overrides, message
):
    out = tmp_path / "out"
    code, err = _main(monkeypatch, capsys, out, *overrides)
    assert code == 2
    assert err.startswith(f"agecls-train: error: {message}") and err.count("\n") == 1, err
    # No data generated or manifest written, no run folder, no MLflow store (so no run in it).
    assert not out.exists()


def test_a_sweep_is_checked_with_its_first_values(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, err = _main(monkeypatch, capsys, out, "-m", "optimizer.lr=-1,1e-3")
    assert (code, err) == (2, "agecls-train: error: optimizer.lr=-1: must be > 0\n")
    code, err = _main(monkeypatch, capsys, out, "-m", "trainer.max_epochs=0", "model=basic_cnn,resnet50")
    assert err == f"agecls-train: error: {dict((o[0], m) for o, m in BAD)['trainer.max_epochs=0']}\n"
    # A study's fixed values are checked; its command-line sweeps are the search space each trial checks.
    code, err = _main(monkeypatch, capsys, out, "-m", "sweep=optuna_optimizers", "model.blocks=6")
    assert err == "agecls-train: error: model.blocks=6 must be between 1 and 5\n"
    code, err = _main(
        monkeypatch,
        capsys,
        out,
        "-m",
        "sweep=optuna_optimizers",
        "model.blocks=choice(6,7)",
        "data.batch_size=0",
    )
    assert err == "agecls-train: error: data.batch_size=0: must be a whole number >= 1\n"
    assert not out.exists()


def test_the_shipped_configs_and_the_projects_own_plus_keys_pass(output_dir):
    for overrides in (
        [],
        ["experiment=agecnn"],
        ["task=multitask", "scheduler=onecycle", "optimizer=adamw"],
        ["scheduler=cosine", "optimizer=sgd", "callbacks.ema.enabled=true"],
        ["scheduler=plateau", "model=resnet50", "data.image_size=32", "model.hidden=8"],
        ["+optimizer.decoupled_weight_decay=true"],  # an Adam argument (bench/levers.py)
    ):
        assert validate(compose_train(overrides)) == [], overrides
    added = ["data.subset", "trainer.accumulate_grad_batches", "callbacks.early_stopping.min_delta"]
    cfg = compose_train(
        [
            "+data.subset={gender: 1}",
            "+trainer.accumulate_grad_batches=2",
            "+callbacks.early_stopping.min_delta=0.01",
            "+tracking.tags.owner=me",
        ]
    )
    check_added_keys(cfg, [*added, "tracking.tags.owner"])
    with pytest.raises(ConfigValueError, match=r"^\+data\.subsett=1: .*; did you mean data\.subset\?"):
        check_added_keys(compose_train(["+data.subsett=1"]), ["data.subsett"])


def test_a_balanced_sampler_with_loss_weights_is_a_warning_and_a_search_needs_a_study():
    cfg = compose_train(["sampler=weighted", "sampler.class_weights=inverse_freq"])
    assert validate(cfg) == [
        "sampler.weighted_sampler=true and sampler.class_weights=inverse_freq: the sampler already draws "
        "every class about equally often, so the loss weights favour rare classes a second time"
    ]
    cfg = compose_train(["bins=search"])
    assert validate(cfg, drawn_later=True) == []
    with pytest.raises(ConfigValueError, match=r"^bins=search has no ranges of its own"):
        validate(cfg)
    with pytest.raises(ConfigValueError, match=r"^bins\.search\.k is required"):
        validate(compose_train(["bins=search", "~bins.search.k"]), drawn_later=True)


def test_minimum_image_sizes_come_from_the_strides_or_a_dry_forward():
    assert min_image_size({"name": "basic_cnn", "blocks": 3})[0] == 8
    assert min_image_size({"name": "densenet121"})[0] == 32
    assert min_image_size({"name": "inception_resnet_v1", "padded": False})[0] == 75
    assert min_image_size({"name": "inception_resnet_v1", "padded": True})[0] == 32
    assert min_image_size({"name": "residual_attention", "stem": "imagenet"})[0] == 32
    assert min_image_size({"name": "torchvision", "arch": "vit_b_16", "kwargs": {}}) == (
        16,
        "the smallest side a test forward pass accepts",
    )


def test_every_shipped_experiment_and_sweep_passes(output_dir, tmp_path):
    for group in ("experiment", "sweep"):
        for name in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
            # data.root: the folder an experiment on real faces needs. A sweep's trials draw some values
            # (bins=search) only when they start.
            cfg = compose_train([f"{group}={name}", f"data.root={tmp_path}"])
            assert validate(cfg, drawn_later=group == "sweep") == [], name


def test_train_checks_before_preparing_data_or_opening_a_run(tmp_path, monkeypatch):
    from agecls.training.train import train

    monkeypatch.setenv("AGECLS_OUTPUT_DIR", str(tmp_path))
    cfg = compose_train(["bins.ranges=[[0,10],[12,116]]"])  # as a sweep job or a library caller passes it
    with pytest.raises(ConfigValueError, match=r"^bins\.ranges=\[\[0,10\],\[12,116\]\]: gap between"):
        train(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()
