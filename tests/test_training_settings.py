"""Every optimizer and scheduler file trains a fast run; clipping, label smoothing and bf16 autocast work."""

from __future__ import annotations

import math

import pytest
from tests.conftest import FAST_OVERRIDES

from agecls.config import CONFIG_DIR
from agecls.training.train import train

pytestmark = pytest.mark.slow

# Two short epochs of a handful of batches: enough for a scheduler to step and a checkpoint to be chosen.
QUICK = [
    *FAST_OVERRIDES,
    "data.synthetic.n=300",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "callbacks.early_stopping.enabled=false",
    "tracking=none",
]


def _files(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _train_ok(compose_cfg, *overrides: str, epochs: int = 2) -> dict:
    results = train(compose_cfg([*QUICK, *overrides]))
    assert math.isfinite(results["objective"]) and 0.0 <= results["test/macro_f1"] <= 1.0
    assert results["epochs_trained"] == epochs
    return results


@pytest.mark.parametrize("name", _files("optimizer"))
def test_every_optimizer_trains(compose_cfg, name):
    _train_ok(compose_cfg, f"optimizer={name}")


@pytest.mark.parametrize("name", _files("scheduler"))
def test_every_scheduler_trains(compose_cfg, name):
    _train_ok(compose_cfg, f"scheduler={name}", "optimizer=sgd")


def test_clipping_label_smoothing_and_bf16_autocast_train(compose_cfg):
    _train_ok(
        compose_cfg,
        "trainer.gradient_clip_val=1.0",
        "task.label_smoothing=0.1",
        "trainer.precision=bf16-mixed",
    )


def test_a_deterministic_bf16_channels_last_run_is_reproduced_exactly(compose_cfg, tmp_path):
    """What `auto` picks on a bf16 CPU (and on GPUs) keeps trainer.deterministic's promise: the same
    config trains the same weights and scores, to the last digit."""
    fast = ["trainer.precision=bf16-mixed", "trainer.channels_last=true", "trainer.deterministic=true"]
    first, second = (_train_ok(compose_cfg, *fast, f"hydra.run.dir={tmp_path / n}") for n in ("a", "b"))
    for key in ("objective", "test/macro_f1", "best_epoch"):
        assert first[key] == second[key], key
    assert first["confusion_test"] == second["confusion_test"]


def test_swa_weights_are_scored_on_validation_and_kept_only_when_better(compose_cfg):
    results = _train_ok(
        compose_cfg,
        "callbacks.swa.enabled=true",
        "callbacks.swa.swa_epoch_start=1",
        "callbacks.swa.annealing_epochs=1",
        epochs=3,  # lightning's SWA adds one epoch that recomputes the BatchNorm statistics
    )
    ckpt = results["checkpoint"]
    assert ckpt.endswith(("best.ckpt", "swa.ckpt"))
    assert results["objective"] == pytest.approx(results["best_val/macro_f1"], abs=1e-6), (
        "the objective is the validation score of the checkpoint that was kept and re-scored"
    )
