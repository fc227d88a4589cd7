"""Checking every configured value a run uses before any data is prepared or an MLflow run opens
(`validate`), and the keys a command adds with `+key=` (`check_added_keys`)."""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agecls.data.faces.framing import FRAMINGS
from agecls.errors import UsageError
from agecls.training.settings import check_pipeline, resolve_auto


class ConfigValueError(UsageError, ValueError):
    """A configured value no run can use (exit code 2); a ValueError too, as the builders raised before."""


OBJECTIVE_MODES = ("min", "max")
CALLBACK_NAMES = ("checkpoint", "early_stopping", "swa", "ema")
SCHEDULER_INTERVALS = ("epoch", "step")
# Keys code reads with a default although no config file sets them (`data.subset`: a hierarchy's expert).
OPTIONAL_KEYS = ("data.subset", "bins.min_age", "bins.max_age")
# Nodes whose keys are free (passed on as they are, or checked against the task where they are read).
FREE_NODES = ("model.kwargs", "tracking.tags", "task.weights")
COMPILE_KEYS = ("enabled", "mode", "backend", "dynamic", "fullgraph")
_NOT_ARGUMENTS = ("self", "params", "optimizer", "args", "kwargs")


def _show(value: Any) -> str:
    """A value as the command line would write it (lists without spaces: [[0,10],[12,20]])."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _fail(key: str, value: Any, valid: str) -> ConfigValueError:
    return ConfigValueError(f"{key}={_show(value)}: {valid}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(key: str, value: Any, low: int, valid: str = "") -> int:
    if not (isinstance(value, int) and not isinstance(value, bool)) or value < low:
        raise _fail(key, value, f"must be a whole number >= {low}{valid}")
    return value


def _within(key: str, value: Any, low: float | None, high: float | None, bounds: str) -> float:
    """`value` as a number inside `bounds` ("> 0", ">= 0", "in [0, 1)", "in (0, 1]"), else the error."""
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if bounds.startswith(("> ", "in (")) else value >= low
    if ok and high is not None:
        ok = value < high if bounds.endswith(")") else value <= high
    if not ok:
        raise _fail(key, value, f"must be {'a number ' if not _is_number(value) else ''}{bounds}")
    return float(value)


# Per argument name of an optimizer or scheduler (torch's names): (low, high, bounds) checked when present.
_OPTIMIZER_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "lr": (0.0, None, "> 0"),
    "weight_decay": (0.0, None, ">= 0"),
    "momentum": (0.0, 1.0, "in [0, 1)"),
    "eps": (0.0, None, "> 0"),
    "alpha": (0.0, 1.0, "in [0, 1]"),
    "rho": (0.0, 1.0, "in [0, 1]"),
    "dampening": (0.0, 1.0, "in [0, 1]"),
    "momentum_decay": (0.0, None, ">= 0"),
    "lr_decay": (0.0, None, ">= 0"),
}
_SCHEDULER_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "gamma": (0.0, 1.0, "in (0, 1]"),
    "eta_min": (0.0, None, ">= 0"),
    "max_lr": (0.0, None, "> 0"),
    "base_lr": (0.0, None, "> 0"),
    "pct_start": (0.0, 1.0, "in (0, 1)"),
    "div_factor": (0.0, None, "> 0"),
    "final_div_factor": (0.0, None, "> 0"),
    "factor": (0.0, 1.0, "in (0, 1)"),
    "threshold": (0.0, None, ">= 0"),
    "min_lr": (0.0, None, ">= 0"),
    "start_factor": (0.0, 1.0, "in (0, 1]"),
    "end_factor": (0.0, 1.0, "in [0, 1]"),
}
_SCHEDULER_COUNTS = {"step_size": 1, "T_max": 1, "T_0": 1, "T_mult": 1, "total_iters": 1, "total_steps": 1}
_SCHEDULER_COUNTS |= {"patience": 0, "cooldown": 0, "epochs": 1, "steps_per_epoch": 1}
_WARMUP_KEYS = ("warmup_epochs", "warmup")


def _arguments(target: Any, where: str) -> tuple[Any, list[str] | None]:
    """The class a `_target_` names and its keyword arguments (None: it takes any)."""
    from hydra.utils import get_class

    try:
        cls = get_class(str(target))
    except Exception:
        raise _fail(f"{where}._target_", target, "not an importable class (e.g. torch.optim.Adam)") from None
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return cls, None
    return cls, [p.name for p in params if p.name not in _NOT_ARGUMENTS]


def _not_an_argument(key: str, value: Any, valid: Sequence[str], owner: str) -> ConfigValueError:
    leaf = key.rsplit(".", 1)[-1]
    parent = key.rsplit(".", 1)[0]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {parent}.{close[0]}?" if close else ""
    return _fail(key, value, f"not an argument of {owner}{hint} (valid: {', '.join(valid)})")


def _check_kwargs(
    node: DictConfig, where: str, cls: Any, valid: list[str] | None, skip: Sequence[str]
) -> None:
    if valid is None:
        return
    for key in node:
        if str(key).startswith("_") or key in skip:
            continue
        if key not in valid:
            raise _not_an_argument(f"{where}.{key}", node[key], valid, cls.__name__)


def _check_trainer(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    max_epochs = _whole("trainer.max_epochs", trainer.get("max_epochs"), 1, " (the epochs the run trains)")
    min_epochs = trainer.get("min_epochs")
    if min_epochs is not None:
        _whole("trainer.min_epochs", min_epochs, 0)
        if min_epochs > max_epochs:
            raise _fail("trainer.min_epochs", min_epochs, f"must be <= trainer.max_epochs={max_epochs}")
    for split in ("train", "val", "test"):
        key = f"limit_{split}_batches"
        value = trainer.get(key)
        if value is None:
            continue
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not (whole and value >= 1) and not (not whole and _is_number(value) and 0 < value <= 1):
            raise _fail(f"trainer.{key}", value, "must be null, a fraction in (0, 1] or a whole number >= 1")
    if trainer.get("log_every_n_steps") is not None:
        _whole("trainer.log_every_n_steps", trainer.log_every_n_steps, 1)
    if trainer.get("gradient_clip_val") is not None:
        _within("trainer.gradient_clip_val", trainer.gradient_clip_val, 0.0, None, ">= 0")
    compile_opts = trainer.get("compile") or {}
    for key in compile_opts:
        if key not in COMPILE_KEYS:
            raise _not_an_argument(f"trainer.compile.{key}", compile_opts[key], COMPILE_KEYS, "torch.compile")
    backend = compile_opts.get("backend")
    if compile_opts.get("enabled") and backend is not None:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if backend not in backends:
            raise ConfigValueError(f"trainer.compile.backend={backend!r}; valid: {', '.join(backends)}")


def _check_data(cfg: DictConfig) -> None:
    data = cfg.data
    _whole("data.batch_size", data.get("batch_size"), 1)
    _whole("data.num_workers", data.get("num_workers", 0), 0)
    _whole("data.crop_margin", data.get("crop_margin", 0), 0)
    if data.get("framing", "none") not in FRAMINGS:
        raise _fail("data.framing", data.get("framing"), "valid: " + " | ".join(FRAMINGS))
    _whole("data.framing_images", data.get("framing_images", 200), 1)
    ratios = OmegaConf.select(data, "split.ratios")
    if ratios is not None:
        ratios = list(ratios)
        ok = len(ratios) == 3 and all(_is_number(r) and r >= 0 for r in ratios)
        if not ok or abs(sum(ratios) - 1.0) > 1e-6 or not ratios[0] > 0:
            raise _fail("data.split.ratios", ratios, "must be three numbers >= 0 (train > 0) summing to 1")


def _check_optimizer(cfg: DictConfig) -> Any:
    """The checked optimizer, built over one dummy parameter (its own checks run too)."""
    from hydra.utils import instantiate

    node = cfg.optimizer
    cls, valid = _arguments(node.get("_target_"), "optimizer")
    _check_kwargs(node, "optimizer", cls, valid, ())
    for key, (low, high, bounds) in _OPTIMIZER_RANGES.items():
        if key in node:
            _within(f"optimizer.{key}", node[key], low, high, bounds)
    if "betas" in node:
        betas = node.betas
        if not (
            isinstance(betas, ListConfig) and len(betas) == 2 and all(_is_number(b) for b in betas)
        ) or not all(0 <= b < 1 for b in betas):
            raise _fail("optimizer.betas", betas, "must be two numbers in [0, 1)")
    try:
        return instantiate(node, _convert_="all")(params=[torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as exc:
        raise ConfigValueError(f"optimizer ({cls.__name__}): {exc}") from None


def _check_scheduler(cfg: DictConfig, optimizer: Any) -> None:
    from hydra.utils import instantiate

    node = cfg.get("scheduler") or {}
    if str(node.get("name", "none")) == "none":
        return
    interval = node.get("interval", "epoch")
    if interval not in SCHEDULER_INTERVALS:
        raise _fail("scheduler.interval", interval, f"valid: {', '.join(SCHEDULER_INTERVALS)}")
    import lightning as L

    planned = dict(node.get("from_trainer") or {})
    for arg, attr in planned.items():
        if not isinstance(getattr(L.Trainer, str(attr), None), property):
            raise _fail(f"scheduler.from_trainer.{arg}", attr, "not a lightning.Trainer attribute")
    params = node.get("params")
    if params is None:
        raise ConfigValueError(f"scheduler={node.get('name')} has no params node with its _target_")
    cls, valid = _arguments(params.get("_target_"), "scheduler.params")
    _check_kwargs(params, "scheduler.params", cls, valid, ())
    for key, arg in planned.items():
        if valid is not None and key not in valid:
            raise _not_an_argument(f"scheduler.from_trainer.{key}", arg, valid, cls.__name__)
    max_epochs = int(cfg.trainer.max_epochs)
    for key, (low, high, bounds) in _SCHEDULER_RANGES.items():
        if key in params:
            value = params[key]
            for i, item in enumerate(value if isinstance(value, ListConfig) else [value]):
                _within(
                    f"scheduler.params.{key}" + (f"[{i}]" if isinstance(value, ListConfig) else ""),
                    item,
                    low,
                    high,
                    bounds,
                )
    for key, low in _SCHEDULER_COUNTS.items():
        if key in params and params[key] is not None:
            _whole(f"scheduler.params.{key}", params[key], low)
    for key in _WARMUP_KEYS:
        if key in params:
            warmup = _whole(f"scheduler.params.{key}", params[key], 0)
            if interval == "epoch" and warmup >= max_epochs:
                raise _fail(f"scheduler.params.{key}", warmup, f"must be < trainer.max_epochs={max_epochs}")
    if "milestones" in params:
        milestones = list(params.milestones)
        if not all(isinstance(m, int) and m >= 1 for m in milestones) or milestones != sorted(
            set(milestones)
        ):
            raise _fail("scheduler.params.milestones", milestones, "must be increasing whole numbers >= 1")
    # Arguments the trainer fills in: the epochs are known, the steps only roughly (one per epoch here).
    extra = {arg: max_epochs for arg in planned}
    try:
        instantiate(params, _convert_="all")(optimizer, **extra)
    except (ValueError, TypeError) as exc:
        raise ConfigValueError(f"scheduler={node.get('name')} ({cls.__name__}): {exc}") from None


def _check_bins(cfg: DictConfig, drawn_later: bool) -> None:
    from agecls.data.bins import AgeBins, BinsError

    bins = cfg.get("bins")
    if bins is None:
        return
    ranges = bins.get("ranges")
    if bins.get("search"):
        from agecls.training.bin_search import search_spec

        try:
            search_spec(bins)  # its keys and their room, checked before a study opens
        except BinsError as exc:
            raise ConfigValueError(str(exc)) from None
    if ranges is None and bins.get("search"):
        if drawn_later:  # each trial of a study draws its own
            return
        raise ConfigValueError(
            "bins=search has no ranges of its own: each trial of an Optuna study draws them "
            "(`-m sweep=optuna_bin_edges`); for a single run pick a bin set such as bins=seed7"
        )
    shown = ranges if ranges is not None else None
    try:
        # No name: the message names the ranges given, which may no longer be the named file's.
        AgeBins.from_config({**OmegaConf.to_container(bins, resolve=True), "name": None})
    except BinsError as exc:
        detail = re.sub(r"^age bins:? ?", "", str(exc))
        raise _fail("bins.ranges", shown, detail) from None


def _check_model(cfg: DictConfig) -> None:
    from agecls.models.limits import check_input
    from agecls.tasks.multitask import is_multitask

    model = OmegaConf.to_container(cfg.model, resolve=True)
    in_chans = 1 if cfg.data.get("grayscale", True) else 3
    try:
        check_input(model, in_chans=in_chans, image_size=cfg.data.image_size, trunk=is_multitask(cfg.task))
    except ValueError as exc:
        raise ConfigValueError(str(exc)) from None


def _check_task(cfg: DictConfig) -> list[str]:
    from agecls.data.batch_augment import mix_spec, tta_mode
    from agecls.tasks.classification import CLASS_WEIGHTING
    from agecls.tasks.heads import AGE_HEADS
    from agecls.tasks.multitask import loss_weights, objective_attribute, task_attributes

    warnings = []
    task, sampler = cfg.task, cfg.sampler
    try:
        attrs = task_attributes(task)
        objective_attribute(task)
        loss_weights(task)
        mix_spec(cfg.get("augment"))
        tta_mode(cfg.get("augment"), allow_auto=True)
    except ValueError as exc:
        raise ConfigValueError(str(exc)) from None
    if task.get("label_smoothing") is not None:
        _within("task.label_smoothing", task.label_smoothing, 0.0, 1.0, "in [0, 1)")
    head = str(task.get("head", "classification"))
    if "age" in attrs and head not in AGE_HEADS:
        raise ConfigValueError(f"task.head={head!r}; valid: {', '.join(AGE_HEADS)}")
    scheme = sampler.get("class_weights", "none")
    if scheme not in CLASS_WEIGHTING:
        raise _fail("sampler.class_weights", scheme, f"valid: {', '.join(CLASS_WEIGHTING)}")
    if sampler.get("weighted_sampler") not in (True, False):
        raise _fail("sampler.weighted_sampler", sampler.get("weighted_sampler"), "valid: true, false")
    warnings += _check_groups(sampler)
    if scheme != "none" and "age" in attrs and head != "classification":
        raise ConfigValueError(
            f"sampler.class_weights={scheme} weighs the cross-entropy of classification heads; "
            f"task.head={head} has none (use sampler.class_weights=none, or sampler=weighted)"
        )
    if scheme != "none" and sampler.weighted_sampler and "target" in sampler.get("groups", ["target"]):
        warnings.append(
            f"sampler.weighted_sampler=true and sampler.class_weights={scheme}: the sampler already draws "
            "every class about equally often, so the loss weights favour rare classes a second time"
        )
    return warnings


def _check_groups(sampler: DictConfig) -> list[str]:
    """`sampler.groups`: a non-empty list of distinct group columns; `sampler.power` in [0, 1]. Returns a
    warning for groups other than the class without the weighted sampler, which alone reads them."""
    from agecls.data.datamodule import SAMPLING_GROUPS

    groups = sampler.get("groups", ["target"])
    valid = f"valid: a non-empty list of {', '.join(SAMPLING_GROUPS)} (e.g. [target,ethnicity])"
    if not isinstance(groups, (ListConfig, list)) or len(groups) == 0:
        raise _fail("sampler.groups", groups, valid)
    shown = f"[{','.join(_show(name) for name in groups)}]"  # as typed on the command line: no quotes
    for name in groups:
        if name not in SAMPLING_GROUPS:
            raise _fail("sampler.groups", shown, f"{_show(name)} is not a group column; {valid}")
    if len(set(groups)) < len(groups):
        raise _fail("sampler.groups", shown, f"a column is named twice; {valid}")
    power = sampler.get("power", 1.0)
    if not _is_number(power) or not 0 <= power <= 1:
        raise _fail("sampler.power", power, "valid: a number in [0, 1] (1: every group drawn equally often)")
    if list(groups) != ["target"] and not sampler.get("weighted_sampler"):
        return [
            f"sampler.groups={shown} with sampler.weighted_sampler=false: the groups are not balanced, every "
            "face is drawn alike (sampler=group_balanced balances them)"
        ]
    return []


def _check_callbacks(cfg: DictConfig) -> None:
    callbacks = cfg.get("callbacks") or {}
    for name in callbacks:
        if name not in CALLBACK_NAMES:
            raise _not_an_argument(
                f"callbacks.{name}", callbacks[name], CALLBACK_NAMES, "the callbacks group"
            )
    swa, ema = callbacks.get("swa") or {}, callbacks.get("ema") or {}
    if swa.get("enabled") and ema.get("enabled"):
        raise ConfigValueError(
            "callbacks.ema.enabled=true and callbacks.swa.enabled=true: two weight averages of one run; "
            "valid: enable one of them"
        )
    stop = callbacks.get("early_stopping") or {}
    if stop.get("patience") is not None:
        _whole("callbacks.early_stopping.patience", stop.patience, 0)
    if ema.get("enabled"):
        _within("callbacks.ema.decay", ema.get("decay", 0.99), 0.0, 1.0, "in (0, 1)")
    mode = OmegaConf.select(cfg, "objective.mode")
    if mode not in OBJECTIVE_MODES:
        raise _fail("objective.mode", mode, f"valid: {', '.join(OBJECTIVE_MODES)}")


def _check_objectives(cfg: DictConfig) -> list[str]:
    """objective.metrics / objective.directions: null (one objective, objective.metric), or two or more
    objectives on offer (agecls.evaluation.objectives), each once, with one direction each. Returns a warning
    for a direction opposite to the one in which the objective is better."""
    from agecls.evaluation.objectives import BETTER, DIRECTIONS, OBJECTIVES, objective_attribute
    from agecls.tasks.multitask import is_multitask

    metrics = OmegaConf.select(cfg, "objective.metrics", default=None)
    directions = OmegaConf.select(cfg, "objective.directions", default=None)
    on_offer = f"valid: {', '.join(OBJECTIVES)}"
    if metrics is None:
        if directions is not None:
            raise _fail(
                "objective.directions",
                directions,
                "directions go with objective.metrics (one each); valid: null with objective.metrics=null",
            )
        return []
    if not isinstance(metrics, ListConfig | list) or len(metrics) < 2:
        raise _fail(
            "objective.metrics",
            metrics,
            f"several objectives are a list of 2 or more (null: the one objective.metric); {on_offer}",
        )
    names = [str(m) for m in metrics]
    for i, name in enumerate(names):
        if name not in OBJECTIVES:
            close = difflib.get_close_matches(name, OBJECTIVES, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            raise _fail(f"objective.metrics[{i}]", name, f"not an objective on offer; {hint}{on_offer}")
        if name in names[:i]:
            raise _fail("objective.metrics", names, f"{name} is listed twice; valid: each objective once")
        attribute = objective_attribute(name)
        if attribute is not None and not is_multitask(cfg.task) and str(cfg.task.get("target")) == attribute:
            others = [m for m in OBJECTIVES if objective_attribute(m) not in (None, attribute)]
            raise _fail(
                f"objective.metrics[{i}]",
                name,
                f"task={cfg.task.name} predicts {attribute}, and its fairness view covers the other "
                f"attributes' groups; valid: {', '.join(others)}",
            )
    usual = [BETTER[name] for name in names]
    example = f"e.g. [{', '.join(usual)}]"
    if not isinstance(directions, ListConfig | list) or len(directions) != len(names):
        raise _fail(
            "objective.directions",
            directions,
            f"one direction ({' or '.join(DIRECTIONS)}) per objective.metrics entry ({len(names)}), "
            f"{example}",
        )
    warnings = []
    for i, (name, direction) in enumerate(zip(names, directions, strict=True)):
        if direction not in DIRECTIONS:
            raise _fail(f"objective.directions[{i}]", direction, f"valid: {', '.join(DIRECTIONS)}")
        if direction != BETTER[name]:
            better, favoured = ("smaller", "larger") if BETTER[name] == "minimize" else ("larger", "smaller")
            warnings.append(
                f"objective.directions[{i}]={direction} for {name}, which is better {better}: the study "
                f"will favour {favoured} values"
            )
    return warnings


def _missing(node: Any, prefix: str) -> list[str]:
    """Dotted keys left `???` (without resolving the interpolations around them)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "???" else []


def validate(cfg: DictConfig, *, drawn_later: bool = False) -> list[str]:
    """Check every configured value a run uses, before any data is prepared or an MLflow run opens:
    ConfigValueError (one line: `key=value: what is valid`) for the first bad one; returns warnings for
    combinations that run but are likely unintended. `drawn_later`: values an Optuna trial draws (bins=search)
    may still be missing."""
    missing = _missing(OmegaConf.to_container(cfg, resolve=False), "")
    data = cfg.get("data") or {}
    if data.get("synthetic") is None and "${data.synthetic." in str(OmegaConf.to_container(data).get("root")):
        missing.insert(0, "data.root")  # `root: ???` of data=utkface merged over the synthetic folder's name
    if missing:
        raise ConfigValueError(f"{missing[0]}=???: a value is required (give it as {missing[0]}=...)")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None) or "the config"
        raise ConfigValueError(f"{where}: {str(exc).splitlines()[0]}") from None
    _check_trainer(cfg)
    _check_data(cfg)
    _check_scheduler(cfg, _check_optimizer(cfg))
    _check_bins(cfg, drawn_later)
    _check_model(cfg)
    warnings = _check_task(cfg)
    _check_callbacks(cfg)
    warnings += _check_objectives(cfg)
    resolved = copy.deepcopy(cfg)
    try:
        resolve_auto(resolved)
        check_pipeline(resolved)
    except ValueError as exc:
        raise ConfigValueError(str(exc)) from None
    return warnings


def check_added_keys(cfg: DictConfig, keys: Sequence[str]) -> None:
    """ConfigValueError for a key added with `+key=`/`++key=` that no code reads (it would be stored in the
    run's config.yaml and ignored), naming the closest valid key. Keys of Hydra and of the Optuna sweeper
    (agecls.sweep checks those) are left to them; arguments of the optimizer, scheduler, trainer and model are
    checked against what those take."""
    from agecls.config import config_keys

    existing = [k for k in config_keys(cfg) if k not in keys and not k.startswith("hydra")]
    for key in keys:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        value = OmegaConf.select(cfg, key)
        if key.startswith(("hydra.", "optuna.")) or key in OPTIONAL_KEYS:
            continue
        if any(node in (key, parent) or parent.startswith(node + ".") for node in FREE_NODES):
            continue  # the node itself (tracking.tags={...} after ~tracking.tags) or any key under it
        if parent in ("optimizer", "scheduler.params", "model"):
            continue  # their arguments are checked against what they take (validate)
        if parent == "trainer":  # lightning.Trainer's arguments, and the trainer file's own keys
            import lightning as L

            _, valid = _arguments("lightning.Trainer", "trainer")
            shipped = [k for k in cfg.trainer if k not in keys]
            skip = ("callbacks", "logger", "default_root_dir")  # set by agecls.training.trainer
            valid = [k for k in valid or [] if k not in skip] + [k for k in shipped if k not in (valid or [])]
            _check_kwargs(cfg.trainer, "trainer", L.Trainer, valid, ())
            continue
        if parent in ("callbacks.early_stopping", "callbacks.swa"):
            target = "lightning.pytorch.callbacks." + (
                "EarlyStopping" if parent.endswith("stopping") else "StochasticWeightAveraging"
            )
            cls, valid = _arguments(target, parent)
            _check_kwargs(
                cfg.callbacks[parent.rsplit(".", 1)[-1]], parent, cls, [*(valid or []), "enabled"], ()
            )
            continue
        known = [*existing, *OPTIONAL_KEYS]
        siblings = [k for k in known if k.startswith(parent + ".")] if parent else existing
        close = difflib.get_close_matches(key, siblings or known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        names = sorted({k[len(parent) + 1 :].split(".")[0] if parent else k.split(".")[0] for k in siblings})
        where = f"keys of {parent}" if parent else "top-level keys"
        raise ConfigValueError(
            f"+{key}={_show(value)}: no code reads {key}, so it would only be stored in config.yaml{hint} "
            f"({where}: {', '.join(names)})"
        )
