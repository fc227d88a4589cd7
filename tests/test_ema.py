"""trainer.ema: the update rule, the config checks, and a fit whose checkpoint holds the averaged weights."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import FAST_OVERRIDES

from agecls.ema import build_ema, ema_update_fn
from agecls.train import build_trainer, train


def test_update_follows_the_warmup_then_the_set_decay():
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    update = ema_update_fn(0.9, warmup=True)
    update(avg, cur, torch.tensor(1))  # after 1 update the decay is min(0.9, 2/11)
    assert avg[0] == pytest.approx(torch.full((3,), 1 - 2 / 11))
    avg = [torch.zeros(3)]
    update(avg, cur, torch.tensor(1000))  # late: the set decay
    assert avg[0] == pytest.approx(torch.full((3,), 0.1))
    avg = [torch.zeros(3)]
    ema_update_fn(0.9, warmup=False)(avg, cur, torch.tensor(1))
    assert avg[0] == pytest.approx(torch.full((3,), 0.1))


def test_integer_buffers_are_copied_not_averaged():
    avg, cur = [torch.tensor([3])], [torch.tensor([10])]
    ema_update_fn(0.5, warmup=True)(avg, cur, torch.tensor(5))
    assert avg[0].item() == 10


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"enabled": True, "decay": 1.5}, "trainer.ema.decay=1.5"),
        ({"enabled": True, "decay": "fast"}, "trainer.ema.decay='fast'"),
        ({"enabled": True, "warmup": "yes"}, "trainer.ema.warmup='yes'"),
        ({"enabled": True, "decya": 0.9}, "trainer.ema.decya is not a key"),
    ],
)
def test_bad_settings_name_the_key(spec, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        build_ema(spec)


def test_off_builds_nothing():
    assert build_ema({"enabled": False, "decay": 0.99}) is None
    assert build_ema(None) is None


def test_ema_and_swa_together_are_refused(compose_cfg, tmp_path):
    cfg = compose_cfg(
        [*FAST_OVERRIDES, "tracking=none", "trainer.ema.enabled=true", "trainer.swa.enabled=true"]
    )
    with pytest.raises(ValueError, match="trainer.ema.enabled=true and trainer.swa.enabled=true"):
        build_trainer(cfg, tmp_path, rec=None)


@pytest.mark.slow
def test_fit_validates_checkpoints_and_tests_the_averaged_weights(compose_cfg):
    results = train(
        compose_cfg(
            [
                *FAST_OVERRIDES,
                "data.synthetic.n=300",
                "trainer.max_epochs=2",
                "trainer.limit_train_batches=3",
                "trainer.early_stopping.enabled=false",
                "tracking=none",
                "trainer.ema.enabled=true",
                "trainer.ema.decay=0.9",
            ]
        )
    )
    assert math.isfinite(results["objective"]) and results["epochs_trained"] == 2
    assert results["objective"] == pytest.approx(results["best_val/macro_f1"], abs=1e-6), (
        "validation during the fit scored the same (averaged) weights that the checkpoint holds"
    )
    ckpt = torch.load(results["checkpoint"], map_location="cpu", weights_only=False)
    averaged, live = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == live.keys()
    floats = [k for k, v in averaged.items() if v.is_floating_point()]
    assert any(not torch.equal(averaged[k], live[k]) for k in floats), "state_dict holds the average"
    assert ckpt["averaging_state"]["n_averaged"].item() >= 1


class _Trainer:
    def __init__(self, steps):
        self.estimated_stepping_batches = steps


@pytest.mark.parametrize(
    ("spec", "steps", "warns"),
    [
        ({"enabled": True, "decay": 0.99, "warmup": False}, 464, True),  # the quality bench's runs
        ({"enabled": True, "decay": 0.99, "warmup": False}, 5000, False),  # long enough
        ({"enabled": True, "decay": 0.99, "warmup": False}, float("inf"), False),  # unknown length
        ({"enabled": True, "decay": 0.99, "warmup": True}, 464, False),  # the warm-up keeps up
    ],
)
def test_a_fixed_decay_too_slow_for_the_run_warns_at_fit_start(spec, steps, warns, caplog):
    callback = build_ema(spec)
    with caplog.at_level("WARNING", logger="agecls.ema"):
        callback.on_fit_start(_Trainer(steps), None)
    assert bool(caplog.records) == warns
    if warns:
        text = caplog.records[0].getMessage()
        assert (
            "decay 0.99 over about 464 steps" in text
            and "holds 63% of the initial weights" in text
            and "0.9% at its end" in text
        )
        assert "trainer.ema.warmup=true" in text
