"""The `callbacks` group: the run's lightning callbacks come from it, not from keys popped out of the
trainer group."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, StochasticWeightAveraging
from omegaconf import OmegaConf, open_dict

from agecls.training.ema import EMAWeights
from agecls.training.settings import resolve_auto
from agecls.training.trainer import CALLBACKS, LastCheckpoint, RandomStreams, build_callbacks

RESUMABLE = [RandomStreams, LastCheckpoint]  # what trainer.resume continues from


def test_the_callbacks_group_holds_every_callback_and_the_trainer_group_none(compose_cfg):
    cfg = compose_cfg()
    assert sorted(cfg.callbacks) == sorted(CALLBACKS)
    assert not set(cfg.trainer) & set(CALLBACKS)
    trainer_args = set(OmegaConf.to_container(cfg.trainer)) - {"channels_last", "compile", "resume"}
    assert "max_epochs" in trainer_args and "precision" in trainer_args


@pytest.mark.parametrize(
    ("overrides", "kinds"),
    [
        ([], [ModelCheckpoint, *RESUMABLE, EarlyStopping]),
        (["scheduler=onecycle"], [ModelCheckpoint, *RESUMABLE]),
        (["callbacks.checkpoint.save_last=false"], [ModelCheckpoint, RandomStreams, EarlyStopping]),
        (
            ["callbacks.early_stopping.enabled=false", "callbacks.swa.enabled=true"],
            [ModelCheckpoint, *RESUMABLE, StochasticWeightAveraging],
        ),
        (
            ["callbacks.ema.enabled=true", "callbacks.ema.decay=0.9"],
            [ModelCheckpoint, *RESUMABLE, EarlyStopping, EMAWeights],
        ),
    ],
)
def test_build_callbacks_follows_the_group(compose_cfg, tmp_path, overrides, kinds):
    cfg = compose_cfg(overrides)
    resolve_auto(cfg)
    callbacks, checkpoint = build_callbacks(cfg.callbacks, tmp_path)
    assert [type(c) for c in callbacks] == kinds
    assert checkpoint is callbacks[0] and checkpoint.monitor == "val/macro_f1" and checkpoint.mode == "max"
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")


def test_an_unknown_callback_is_refused_with_the_valid_names(compose_cfg, tmp_path):
    cfg = compose_cfg()
    resolve_auto(cfg)
    with open_dict(cfg):
        cfg.callbacks.lr_monitor = {"enabled": True}
    with pytest.raises(
        ValueError, match="callbacks.lr_monitor is not a callback; valid: checkpoint, early_stopping"
    ):
        build_callbacks(cfg.callbacks, tmp_path)


def test_the_old_trainer_keys_are_not_accepted(compose_cfg):
    with pytest.raises(Exception, match="ema"):
        compose_cfg(["trainer.ema.enabled=true"])
