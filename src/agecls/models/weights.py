"""`model.weights=PATH`: load a local state dict into a zoo model; never downloads anything.

Only the layers a model built fresh (`ModelParts.new`: the classifier sized by num_classes) and its first
conv (`ModelParts.stem`: the input channels) may differ from the file; any other missing, unexpected or
mis-shaped key is an error naming the file and the keys, unless `model.strict_weights=false`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from agecls.models.parts import ModelParts, under

log = logging.getLogger(__name__)

# Keys a file may hold its tensors under (Lightning checkpoints: 'state_dict'; many scripts: 'model').
_CONTAINER_KEYS = ("state_dict", "model")
# Prefixes taken automatically when no key of the file fits the model as it is: agecls's own checkpoints
# ('model.': FaceClassifier.model; its other tensors, e.g. task heads, left out) and DataParallel ('module.').
_AUTO_PREFIXES = ("model.", "module.")
# torchvision's DenseNet files use the old 'norm.1' style names (torchvision renames them the same way).
_DENSENET_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_SHOWN = 12  # keys listed per kind in an error


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What `load_weights` did, for the log and for tests."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # first-conv tensors converted to the input channels
    skipped: list[str] = field(default_factory=list)  # new layers left as initialised (shape differs)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local file: a raw state dict or a dict holding one under 'state_dict'/'model'."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.weights={path}: no such file (weights are only read from local disk)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated file, not a torch file
        raise WeightsError(f"model.weights={path}: cannot be read as a torch state dict ({err})") from err
    if isinstance(obj, dict):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(
            f"model.weights={path}: holds no state dict (a dict of tensors, optionally under "
            f"{' or '.join(map(repr, _CONTAINER_KEYS))})"
        )
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"model.weights={path}: the dict holds no tensors")
    return state


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str | None, own: set[str], path: Path) -> dict:
    """Keep the file's keys under `prefix`, without it (null: one of `_AUTO_PREFIXES` when the file is clearly
    a wrapper's: no key fits the model as it is, some start with the prefix and none of the model's do)."""
    if prefix is None:
        if own & set(state):
            return state
        candidates = [a for a in _AUTO_PREFIXES if any(k.startswith(a) for k in state)]
        candidates = [a for a in candidates if not any(k.startswith(a) for k in own)]
        if not candidates:
            return state
        prefix = candidates[0]
    if not prefix:
        return state
    stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not stripped:
        raise WeightsError(f"model.weights={path}: no key starts with model.weights_prefix={prefix!r}")
    dropped = len(state) - len(stripped)
    if dropped:
        log.info("model.weights=%s: %d tensors outside %r left out (e.g. task heads)", path, dropped, prefix)
    return stripped


def _rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's old DenseNet key style ('...denselayer1.norm.1.weight' -> '...norm1.weight')."""
    out = {}
    for key, value in state.items():
        match = _DENSENET_OLD.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _adapt_channels(weight: torch.Tensor, target: torch.Size) -> torch.Tensor | None:
    """A first-conv weight for another number of input channels (3 -> 1: sum; 1 -> 3: repeat / 3)."""
    if weight.dim() != 4 or weight.shape[0] != target[0] or weight.shape[2:] != target[2:]:
        return None
    src, dst = weight.shape[1], target[1]
    if dst == 1:
        return weight.sum(dim=1, keepdim=True)
    if src == 1:
        return weight.repeat(1, dst, 1, 1) / dst
    return None


def _listing(kind: str, keys: list[str]) -> str:
    more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{kind} ({len(keys)}): {', '.join(keys[:_SHOWN])}{more}"


def load_weights(
    model: nn.Module,
    parts: ModelParts,
    path: str | Path,
    *,
    name: str,
    prefix: str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load the local file at `path` into `model` in place (see the module docstring for the rules)."""
    path = Path(path).expanduser()
    own = model.state_dict()
    state = _rename_legacy(_strip_prefix(read_state_dict(path), prefix, set(own), path))
    report = LoadReport()
    merged = dict(own)
    for key, value in state.items():
        if key not in own:
            if not under(key, parts.new):
                report.unexpected.append(key)
            continue
        target = own[key]
        if value.shape == target.shape:
            merged[key] = value.to(target.dtype)
            report.loaded.append(key)
        elif under(key, parts.new):
            report.skipped.append(key)
        elif under(key, parts.stem):
            adapted = _adapt_channels(value, target.shape)
            if adapted is None:
                report.skipped.append(key)
            else:
                merged[key] = adapted.to(target.dtype)
                report.adapted.append(key)
        else:
            report.mismatched.append(f"{key} file {tuple(value.shape)} vs model {tuple(target.shape)}")
    report.missing = [
        k for k in own if k not in state and not under(k, parts.new) and not k.endswith("num_batches_tracked")
    ]
    problems = [
        _listing(kind, keys)
        for kind, keys in (
            ("missing from the file", report.missing),
            ("unexpected in the file", report.unexpected),
            ("shape mismatches", report.mismatched),
        )
        if keys
    ]
    if not report.loaded and not report.adapted:
        hint = f"; first keys of the file: {', '.join(list(state)[:5])}" if state else ""
        raise WeightsError(
            f"model.weights={path}: no tensor fits model {name!r} (wrong model, or set model.weights_prefix)"
            f"{hint}"
        )
    if problems and strict:
        raise WeightsError(
            f"model.weights={path} does not fit model {name!r}: "
            + "; ".join(problems)
            + ". Set model.strict_weights=false to load only the matching tensors."
        )
    model.load_state_dict(merged)
    log.info(
        "model.weights=%s: %d tensors loaded, %d first-conv tensors adapted, %d new-layer tensors left "
        "initialised%s",
        path,
        len(report.loaded),
        len(report.adapted),
        len(report.skipped),
        f"; ignored (strict_weights=false): {'; '.join(problems)}" if problems else "",
    )
    return report
