"""Exponential moving average of the weights (`callbacks.ema`), a quality lever the dissertation did not have.

Lightning's `WeightAveraging` callback does the bookkeeping (a `torch.optim.swa_utils.AveragedModel` beside
the module, updated after every optimizer step; validation runs on the averaged weights, checkpoints hold
them in `state_dict` and the live weights under `current_model_state`, so a resumed fit continues both).
What agecls adds is the update rule: with `warmup`, the decay after n updates is min(decay, (1+n)/(10+n))
(as timm's ModelEmaV2 and TF's ExponentialMovingAverage with num_updates), so in the short runs of a sweep
the average is not dominated by the first, random, weights; `decay` itself only binds after
(10 decay - 1) / (1 - decay) updates (890 for 0.99, 1990 for 0.995): a shorter run's average weighs step k
of N about as (k/N)^8 (about 60% of the weight on the last tenth of the steps), whatever `decay` is.
The average is kept by `HostCountedAveragedModel`, an AveragedModel whose update never reads its update
counter back from the device: torch's `update_parameters` compares its device counter with 0 twice per step,
which on a GPU waits for the queued work every step and stops the host from running ahead. It counts on the
host instead (read from the device once per fit, so a resumed fit continues the count) and still advances
the device counter that checkpoints save. The update is the same arithmetic as torch's path (float32 decay),
so averages match it exactly (tests/test_ema.py).

Because validation sees the averaged weights, everything chosen on validation (the best checkpoint, early
stopping, the sweeper's pruning and objective) is about the averaged model, and that is the model tested and
predicted with. Integer buffers (BatchNorm's num_batches_tracked) are copied, not averaged.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel

log = logging.getLogger(__name__)
KEYS = ("enabled", "decay", "warmup")


class EMAWeights(WeightAveraging):
    """Lightning's `WeightAveraging` with agecls's update rule, warning at the start of a fit when a fixed
    decay (`warmup=false`) is too slow for the run: validation (best checkpoint, early stopping, pruning)
    sees an average that still holds decay^n of the initial weights after n steps."""

    def __init__(self, decay: float, warmup: bool):
        super().__init__(use_buffers=True, multi_avg_fn=ema_update_fn(decay, warmup))
        self.decay, self.warmup = decay, warmup

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        built = self._average_model
        if built is not None and type(built) is AveragedModel and built.use_buffers:
            # the same module, buffers and state; only update_parameters differs (no device reads)
            self._average_model.__class__ = HostCountedAveragedModel

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        steps = trainer.estimated_stepping_batches
        if not self.warmup and steps != float("inf") and steps < 10 / (1 - self.decay):
            log.warning(
                "callbacks.ema.warmup=false with decay %g over about %d steps: the average holds %.0f%% of "
                "the initial weights a tenth into the run and %.1f%% at its end, and validation, early "
                "stopping and the best checkpoint see it (a short run can stop before it recovers); use "
                "callbacks.ema.warmup=true, or a decay with 1/(1-decay) well under the run's steps",
                self.decay,
                steps,
                100 * self.decay ** (steps / 10),
                100 * self.decay**steps,
            )


class HostCountedAveragedModel(AveragedModel):
    """`AveragedModel` whose `update_parameters` keeps its update count on the host: no device read per
    step (see the module docstring). `EMAWeights.setup` makes Lightning's AveragedModel one; same state."""

    _host_n: int | None = None  # updates so far; None: read `n_averaged` once (a new fit, or after a load)

    def load_state_dict(self, *args, **kwargs):
        self._host_n = None
        return super().load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        if self._host_n is None:
            self._host_n = int(self.n_averaged)
        mine = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for avg, cur in zip(mine, theirs, strict=True):
            avg = avg.detach()
            got = groups.setdefault((avg.device, avg.dtype), ([], []))
            got[0].append(avg)
            got[1].append(cur.detach().to(avg.device))
        for averaged, current in groups.values():
            if self._host_n == 0:
                torch._foreach_copy_(averaged, current)
            else:
                self.multi_avg_fn(averaged, current, self._host_n)
        self.n_averaged += 1
        self._host_n += 1


def ema_update_fn(decay: float, warmup: bool):
    """`multi_avg_fn` for AveragedModel: lerp each averaged tensor towards the live one by 1 - decay_n. The
    update count is a host int (`HostCountedAveragedModel`) or, from torch's own AveragedModel, a tensor on
    the device; the decay is computed in float32 either way."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged) -> None:
        if not (torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0])):
            torch._foreach_copy_(averaged, current)
            return
        if not warmup:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        elif isinstance(n_averaged, torch.Tensor):
            n = n_averaged.to(torch.float32)
            weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay)
            torch._foreach_lerp_(averaged, current, weight.to(averaged[0].dtype))
        else:
            n = np.float32(n_averaged)
            ratio = min((np.float32(1.0) + n) / (np.float32(10.0) + n), np.float32(decay))
            torch._foreach_lerp_(averaged, current, float(np.float32(1.0) - ratio))

    return update


def build_ema(spec: dict[str, Any] | None) -> EMAWeights | None:
    """The callback for the `callbacks.ema` mapping, None when it is off; ValueError naming the key."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ValueError(f"callbacks.ema.{unknown[0]} is not a key; valid: {', '.join(KEYS)}")
    if not spec.get("enabled", False):
        return None
    decay = spec.get("decay", 0.99)
    if not isinstance(decay, int | float) or isinstance(decay, bool) or not 0.0 < float(decay) < 1.0:
        raise ValueError(f"callbacks.ema.decay={decay!r}; valid: a number between 0 and 1 (e.g. 0.99, 0.999)")
    warmup = spec.get("warmup", True)
    if not isinstance(warmup, bool):
        raise ValueError(f"callbacks.ema.warmup={warmup!r}; valid: true or false")
    return EMAWeights(float(decay), warmup)
