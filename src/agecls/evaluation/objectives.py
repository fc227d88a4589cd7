"""The objectives a study may optimise together (`objective.metrics`): accuracy, fairness across groups and
cost, each computed for a finished run on validation at its selected checkpoint.

- `val/macro_f1`: the task's validation macro-F1 (with the flip TTA `augment.tta=auto` chose, as the single
  objective has it);
- `val/fairness_gap_<attribute>`: the largest minus the smallest macro-F1 of the task across the groups of
  gender or ethnicity that have faces on validation (the run's fairness view, `fairness_val.csv`);
- `val/worst_group_f1_<attribute>`: the smallest of those macro-F1s;
- `model/params`: the model's parameter count;
- `model/latency_ms`: inference milliseconds per face, timed on the machine that ran the run;
- `train/wall_seconds`: how long fitting took.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

FAIRNESS_ATTRIBUTES = ("gender", "ethnicity")
OBJECTIVES = (
    "val/macro_f1",
    "val/fairness_gap_gender",
    "val/fairness_gap_ethnicity",
    "val/worst_group_f1_gender",
    "val/worst_group_f1_ethnicity",
    "model/params",
    "model/latency_ms",
    "train/wall_seconds",
)
DIRECTIONS = ("maximize", "minimize")
# The direction in which each objective is better: a study asking for the other one is likely a slip.
BETTER = {
    name: "minimize" if name.startswith(("val/fairness_gap", "model/", "train/")) else "maximize"
    for name in OBJECTIVES
}


def objective_attribute(name: str) -> str | None:
    """The group attribute a fairness objective is about (`val/fairness_gap_gender` -> gender), else None."""
    for prefix in ("val/fairness_gap_", "val/worst_group_f1_"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def _groups(table: pd.DataFrame, attribute: str) -> pd.Series:
    """Macro-F1 per group of `attribute` with at least one face; ValueError naming what the table holds."""
    rows = table[(table["attribute"] == attribute) & (table["n"] >= 1)]
    if rows.empty:
        held = sorted(set(table["attribute"])) if len(table) else []
        raise ValueError(
            f"the fairness table has no group of {attribute} (it covers: {', '.join(held) or 'nothing'})"
        )
    return rows.set_index("group")["macro_f1"].astype(float)


def fairness_gap(table: pd.DataFrame, attribute: str) -> float:
    """Largest minus smallest macro-F1 across the groups of `attribute` in a fairness table (columns
    attribute, group, n, macro_f1, acc; as `evaluate_splits` returns it). ValueError with fewer than two
    groups: a gap needs two."""
    scores = _groups(table, attribute)
    if len(scores) < 2:
        raise ValueError(
            f"the fairness table has one group of {attribute} ({scores.index[0]}); a gap needs two"
        )
    return float(scores.max() - scores.min())


def worst_group_f1(table: pd.DataFrame, attribute: str) -> float:
    """The smallest macro-F1 across the groups of `attribute` in a fairness table."""
    return float(_groups(table, attribute).min())


def param_count(module: nn.Module) -> int:
    """Parameters of a module (trainable or not; a shared tensor counted once)."""
    return int(sum(p.numel() for p in module.parameters()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(
    module: nn.Module,
    image_size: int,
    channels: int,
    device: torch.device | str | None = None,
    *,
    batch: int = 32,
    repeats: int = 5,
    warmup: int = 2,
    channels_last: bool = False,
) -> float:
    """Inference milliseconds per face: the median of `repeats` timed forward passes of `batch` random faces
    (eval mode, after `warmup` untimed ones), divided by `batch`. It is this machine's figure, measured at
    the moment the run ended: other hardware, thread counts or a busy machine give other numbers."""
    device = torch.device(device) if device is not None else next(module.parameters()).device
    faces = torch.rand(batch, channels, image_size, image_size, device=device)
    if channels_last:
        faces = faces.contiguous(memory_format=torch.channels_last)
    was_training = module.training
    module.eval()
    seconds = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _sync(device)
                started = time.perf_counter()
                module(faces)
                _sync(device)
                if i >= warmup:
                    seconds.append(time.perf_counter() - started)
    finally:
        module.train(was_training)
    return float(np.median(seconds)) * 1000.0 / batch


def compute_objectives(
    *,
    macro_f1: float,
    fairness: pd.DataFrame | None,
    module: nn.Module,
    fit_seconds: float,
    image_size: int,
    channels: int,
    channels_last: bool = False,
    wanted: Sequence[str] = (),
) -> dict[str, float]:
    """{objective name: value} of a finished run: every objective that can be computed for it, in the order
    of OBJECTIVES. A fairness objective needs its attribute in `fairness` (validation's table; a task is not
    judged across its own attribute's groups), a gap two groups; latency is timed only when `wanted` names
    it (it costs a few forward passes)."""
    values: dict[str, float] = {"val/macro_f1": float(macro_f1)}
    table = (
        fairness if fairness is not None else pd.DataFrame(columns=["attribute", "group", "n", "macro_f1"])
    )
    for attribute in FAIRNESS_ATTRIBUTES:
        for name, score in (
            (f"val/fairness_gap_{attribute}", fairness_gap),
            (f"val/worst_group_f1_{attribute}", worst_group_f1),
        ):
            try:
                values[name] = score(table, attribute)
            except ValueError:
                continue
    values["model/params"] = float(param_count(module))
    if "model/latency_ms" in wanted:
        values["model/latency_ms"] = latency_ms(module, image_size, channels, channels_last=channels_last)
    values["train/wall_seconds"] = float(fit_seconds)
    return {name: values[name] for name in OBJECTIVES if name in values}


def missing_objectives(values: dict[str, float], wanted: Sequence[str], table: pd.DataFrame | None) -> str:
    """Why objectives of `wanted` are absent from `values` (one line), or '' when none is."""
    missing = [name for name in wanted if name not in values]
    if not missing:
        return ""
    why = []
    for name in missing:
        attribute = objective_attribute(name)
        reason = "not computed"
        if attribute is not None and table is not None:
            try:
                groups = len(_groups(table, attribute))
                reason = f"validation has faces of {groups} {attribute} group(s); a gap needs two"
            except ValueError as exc:
                reason = str(exc)
        why.append(f"{name}: {reason}")
    return "; ".join(why)
