"""callbacks.ema: the update rule, the config checks, and a fit whose checkpoint holds the averaged
weights."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import FAST_OVERRIDES

from agecls.training.ema import HostCountedAveragedModel, build_ema, ema_update_fn
from agecls.training.settings import resolve_auto
from agecls.training.train import train
from agecls.training.trainer import build_trainer


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


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def _steps(net, n, seed=1):
    """n small random changes of the live weights (and its BatchNorm statistics), one per update."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        net.train()(torch.randn(16, 4, generator=gen))
        yield


@pytest.mark.parametrize("warmup", [True, False])
def test_host_counted_average_equals_torchs_averaged_model_exactly(warmup):
    from torch.optim.swa_utils import AveragedModel

    fn = ema_update_fn(0.9, warmup)
    live_a, live_b = _net(), _net()
    theirs = AveragedModel(live_a, use_buffers=True, multi_avg_fn=fn)
    mine = AveragedModel(live_b, use_buffers=True, multi_avg_fn=fn)
    mine.__class__ = HostCountedAveragedModel  # as EMAWeights.setup does
    for _ in zip(_steps(live_a, 30), _steps(live_b, 30), strict=True):
        theirs.update_parameters(live_a)
        mine.update_parameters(live_b)
    for (name, a), b in zip(theirs.state_dict().items(), mine.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert int(mine.n_averaged) == 30 and mine.module[1].num_batches_tracked.item() == 30


class _NoHostRead(torch.Tensor):
    def __bool__(self):
        raise AssertionError("the update read its counter back from the device")

    item = __int__ = __float__ = __index__ = __bool__


def test_host_counted_average_never_reads_its_counter_after_the_first_update_and_resumes():
    live = _net()
    avg = _host_counted(live)
    steps = _steps(live, 12)
    for _ in range(4):
        next(steps)
        avg.update_parameters(live)
    avg.n_averaged = avg.n_averaged.as_subclass(_NoHostRead)
    for _ in range(4):
        next(steps)
        avg.update_parameters(live)  # raises if it compares or converts the device counter
    state = {k: v.as_subclass(torch.Tensor) for k, v in avg.state_dict().items()}
    assert int(state["n_averaged"]) == 8
    # a resumed fit loads the saved average and its count, and the host count follows it
    resumed = _host_counted(live)
    resumed.update_parameters(live)  # a fresh average: its first update copies the live weights
    resumed.load_state_dict(state)
    next(steps)
    resumed.update_parameters(live)
    avg.update_parameters(live)
    assert int(resumed.n_averaged) == 9
    for (name, a), b in zip(avg.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a.as_subclass(torch.Tensor), b), name


def _host_counted(live):
    from torch.optim.swa_utils import AveragedModel

    avg = AveragedModel(live, use_buffers=True, multi_avg_fn=ema_update_fn(0.9, True))
    avg.__class__ = HostCountedAveragedModel
    return avg


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"enabled": True, "decay": 1.5}, "callbacks.ema.decay=1.5"),
        ({"enabled": True, "decay": "fast"}, "callbacks.ema.decay='fast'"),
        ({"enabled": True, "warmup": "yes"}, "callbacks.ema.warmup='yes'"),
        ({"enabled": True, "decya": 0.9}, "callbacks.ema.decya is not a key"),
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
        [*FAST_OVERRIDES, "tracking=none", "callbacks.ema.enabled=true", "callbacks.swa.enabled=true"]
    )
    resolve_auto(cfg)
    with pytest.raises(ValueError, match="callbacks.ema.enabled=true and callbacks.swa.enabled=true"):
        build_trainer(cfg, tmp_path, rec=None)


@pytest.mark.slow
def test_fit_validates_checkpoints_and_tests_the_averaged_weights(compose_cfg, monkeypatch):
    updates = []
    original = HostCountedAveragedModel.update_parameters

    def counting(self, model):
        updates.append(self._host_n)
        return original(self, model)

    monkeypatch.setattr(HostCountedAveragedModel, "update_parameters", counting)
    results = train(
        compose_cfg(
            [
                *FAST_OVERRIDES,
                "data.synthetic.n=300",
                "trainer.max_epochs=2",
                "trainer.limit_train_batches=3",
                "callbacks.early_stopping.enabled=false",
                "tracking=none",
                "callbacks.ema.enabled=true",
                "callbacks.ema.decay=0.9",
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
    # the fit's average is agecls's host-counted one: one update per optimizer step (2 epochs x 3), the count
    # read from the device once (None), and the device counter the checkpoint saves kept in step
    assert updates == [None, 1, 2, 3, 4, 5]
    assert ckpt["averaging_state"]["n_averaged"].item() == 3 * results["best_epoch"]


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
    with caplog.at_level("WARNING", logger="agecls.training.ema"):
        callback.on_fit_start(_Trainer(steps), None)
    assert bool(caplog.records) == warns
    if warns:
        text = caplog.records[0].getMessage()
        assert (
            "decay 0.99 over about 464 steps" in text
            and "holds 63% of the initial weights" in text
            and "0.9% at its end" in text
        )
        assert "callbacks.ema.warmup=true" in text
