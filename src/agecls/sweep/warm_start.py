"""Warm starts: known configurations a study evaluates first, so it starts from the best known point and can
only add to it.

`optuna.enqueue` lists them by hand (e.g. the dissertation's final settings); `optuna.enqueue_from` takes the
top trials of another finished study (a cheaper scale: a smaller image size or data fraction), so the
expensive study starts from the cheap one's findings. Each entry gives values for keys of the search space;
keys it leaves out are drawn by the sampler. Enqueueing is idempotent: re-running the command (resume, or a
second worker) enqueues nothing twice."""

from __future__ import annotations

import logging
from typing import Any

from agecls.errors import UsageError

log = logging.getLogger(__name__)


def _check_value(where: str, key: str, value: Any, dist) -> Any:
    """`value` in `dist` (as the distribution's own type), or UsageError naming the key and what is valid."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if choice == value or str(choice) == str(value):
                return choice
        raise UsageError(
            f"{where}: {key}={value!r} is not a choice of the search space; valid: {list(dist.choices)}"
        )
    if isinstance(dist, IntDistribution | FloatDistribution):
        try:
            number = int(value) if isinstance(dist, IntDistribution) else float(value)
        except (TypeError, ValueError):
            raise UsageError(
                f"{where}: {key}={value!r} is not a number; valid: {dist.low} to {dist.high}"
            ) from None
        if not dist.low <= number <= dist.high:
            raise UsageError(
                f"{where}: {key}={value!r} is outside the search space; valid: {dist.low} to {dist.high}"
            )
        return number
    return value


def check_entry(where: str, entry: Any, space: dict[str, Any]) -> dict[str, Any]:
    """One warm start as {param: value} within `space`; UsageError naming the entry and key otherwise."""
    if not isinstance(entry, dict) or not entry:
        raise UsageError(f"{where}: expected a mapping of search-space keys to values, got {entry!r}")
    params = {}
    for key, value in entry.items():
        if key not in space:
            valid = ", ".join(space) or "none (the search space is empty)"
            raise UsageError(f"{where}: {key} is not a key of the search space; valid: {valid}")
        params[key] = _check_value(where, key, value, space[key])
    return params


def top_configurations(
    storage: str, study_name: str, top: int, space: dict[str, Any]
) -> list[dict[str, Any]]:
    """The params of the best `top` COMPLETE trials of another study, restricted to this study's `space`
    (values outside it are left to the sampler). A source study of several objectives offers its Pareto
    front's trials, best first by its first objective."""
    import optuna
    from optuna.trial import TrialState

    try:
        source = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise UsageError(f"optuna.enqueue_from.study={study_name}: no such study in {storage}") from None
    if len(source.directions) > 1:
        complete = list(source.best_trials)  # its Pareto front: no trial there is worse in every objective
    else:
        complete = [t for t in source.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    complete.sort(key=lambda t: t.values[0], reverse=source.directions[0].name == "MAXIMIZE")
    out = []
    for trial in complete[:top]:
        kept = {}
        for key, value in trial.params.items():
            if key in space:
                try:
                    kept[key] = _check_value("", key, value, space[key])
                except UsageError:
                    continue
        if kept and kept not in out:
            out.append(kept)
    return out


def warm_starts(ocfg, space: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) of every configured warm start, checked against the search space."""
    entries: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(ocfg.get("enqueue") or []):
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else entry
        entries.append((f"enqueue[{i}]", check_entry(f"optuna.enqueue[{i}]", raw, space)))
    source = ocfg.get("enqueue_from")
    if source:
        storage = str(source.get("storage") or ocfg.storage)
        name = str(source["study"])
        for i, params in enumerate(top_configurations(storage, name, int(source.get("top", 3)), space)):
            entries.append((f"{name}#{i + 1}", params))
    return entries


def enqueue_warm_starts(study, entries: list[tuple[str, dict[str, Any]]]) -> int:
    """Enqueue each warm start the study does not already hold (any state, same params); returns how many
    were added. The trial carries user attr `warm_start` (its label), which agecls-report shows."""
    held = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)]
    added = 0
    for label, params in entries:
        if any(all(h.get(k) == v for k, v in params.items()) for h in held):
            continue
        study.enqueue_trial(params, user_attrs={"warm_start": label})
        held.append(params)
        added += 1
    if added:
        log.info(
            "warm start: %d configuration(s) enqueued to run first: %s",
            added,
            ", ".join(label for label, _ in entries),
        )
    return added
