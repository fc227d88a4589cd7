"""Reading a multi-objective Optuna study: its Pareto front, the front's named points (`best_f1`, `fairest`,
`smallest`), a rule the user sets to pick one trial, and the front as a table with bootstrap intervals on
validation from each trial's predictions_val.csv.

A rule reads `min|max OBJECTIVE [where OBJECTIVE OP BOUND [and ...]]`, OP one of >=, <=, >, <, and BOUND a
number or `best`, `best - X`, `best + X` (`best`: that objective's best value over the study's complete
trials, in its direction). "The fairest within 1 point of the best F1" is
`min val/fairness_gap_ethnicity where val/macro_f1 >= best - 0.01`."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecls.errors import AgeclsError, UsageError
from agecls.evaluation.bootstrap import _resamples, bootstrap_ci

F1 = "val/macro_f1"
PARAMS = "model/params"
GAP = "val/fairness_gap_"
WORST = "val/worst_group_f1_"
# The direction of each objective agecls computes: a rule's `best` of a name that is not one of the study's
# own objectives (a value the trials recorded in their `objectives` attribute) needs it.
KNOWN_DIRECTIONS = {
    F1: "maximize",
    f"{GAP}gender": "minimize",
    f"{GAP}ethnicity": "minimize",
    f"{WORST}gender": "maximize",
    f"{WORST}ethnicity": "maximize",
    PARAMS: "minimize",
    "model/latency_ms": "minimize",
    "train/wall_seconds": "minimize",
}
NAMED = ("best_f1", "fairest", "smallest")
RULE_FORM = (
    'a rule reads "min|max OBJECTIVE [where OBJECTIVE >=|<=|>|< best|best - X|best + X|NUMBER [and ...]]", '
    'e.g. "min val/fairness_gap_ethnicity where val/macro_f1 >= best - 0.01"'
)


class RuleError(UsageError):
    """A rule that cannot be read, or names an objective the study does not have."""


def is_multi(study) -> bool:
    """Whether the study optimises several objectives."""
    return len(study.directions) > 1


def objective_names(study) -> list[str]:
    """The study's objective names in the order of its trials' values (`study.metric_names`); a study
    created without names gets `objective_0`, ... (a single-objective one: `value`)."""
    names = study.metric_names
    if names:
        return list(names)
    return ["value"] if not is_multi(study) else [f"objective_{i}" for i in range(len(study.directions))]


def directions(study) -> dict[str, str]:
    """{objective name: "maximize" | "minimize"} of the study."""
    return {n: d.name.lower() for n, d in zip(objective_names(study), study.directions, strict=True)}


def complete_trials(study) -> list:
    """The study's COMPLETE trials with values, by number."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if t.values is not None]


def pareto_front(study) -> list:
    """The complete trials no other complete trial dominates (Optuna's `best_trials`), by number."""
    if not complete_trials(study):
        return []
    return sorted(study.best_trials, key=lambda t: t.number)


def trial_values(trial, names: Sequence[str]) -> dict[str, float]:
    """Every objective value a trial holds: the `objectives` it recorded, overridden by the study's values."""
    recorded = trial.user_attrs.get("objectives") or {}
    values = {str(k): float(v) for k, v in recorded.items() if isinstance(v, int | float)}
    values.update({n: float(v) for n, v in zip(names, trial.values or (), strict=False)})
    return values


def _fairness_objective(dirs: dict[str, str]) -> str | None:
    """The objective `fairest` minimises (a gap) or maximises (a worst-group F1): the study's first one."""
    return next((n for n in dirs if n.startswith(GAP)), None) or next(
        (n for n in dirs if n.startswith(WORST)), None
    )


def _pick(candidates: list, name: str, direction: str, names: Sequence[str], front: set[int]):
    """The candidate best in `name`; ties go to a front member, then the higher val/macro_f1, then the
    lower trial number."""
    sign = -1.0 if direction == "maximize" else 1.0

    def key(t) -> tuple:
        values = trial_values(t, names)
        return (sign * values[name], t.number not in front, -values.get(F1, 0.0), t.number)

    return min((t for t in candidates if name in trial_values(t, names)), key=key, default=None)


def named_points(study) -> dict[str, Any]:
    """{alias: trial} of the front: `best_f1` (highest val/macro_f1), `fairest` (lowest fairness gap, or
    highest worst-group F1, when the study has one), `smallest` (fewest model/params, when it has it)."""
    front = pareto_front(study)
    names, dirs = objective_names(study), directions(study)
    numbers = {t.number for t in front}
    wanted = {"best_f1": F1, "fairest": _fairness_objective(dirs), "smallest": PARAMS}
    points = {}
    for alias, name in wanted.items():
        if name in dirs:
            chosen = _pick(front, name, dirs[name], names, numbers)
            if chosen is not None:
                points[alias] = chosen
    return points


# -- rules --------------------------------------------------------------------------------------------------
OPS = (">=", "<=", ">", "<")
_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op>>=|<=|>|<)|(?P<sign>[-+])"
    r"|(?P<word>[A-Za-z_][\w./]*)|(?P<bad>\S))"
)


@dataclass(frozen=True)
class Condition:
    """`objective op bound`; bound is `number`, or the objective's best value plus `offset` when `best`."""

    objective: str
    op: str
    offset: float
    best: bool

    def bound(self, best: float) -> float:
        return best + self.offset if self.best else self.offset

    def holds(self, value: float, best: float) -> bool:
        bound = self.bound(best)
        return {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[self.op]

    def __str__(self) -> str:
        if not self.best:
            return f"{self.objective} {self.op} {self.offset:g}"
        shift = "" if self.offset == 0 else f" {'-' if self.offset < 0 else '+'} {abs(self.offset):g}"
        return f"{self.objective} {self.op} best{shift}"


@dataclass(frozen=True)
class Rule:
    """`goal` ("min" | "max") of `objective` among the complete trials meeting every condition."""

    text: str
    goal: str
    objective: str
    conditions: tuple[Condition, ...] = ()

    def names(self) -> list[str]:
        return [self.objective, *(c.objective for c in self.conditions)]


def _tokens(text: str) -> list[tuple[str, str]]:
    return [(m.lastgroup or "", m.group(m.lastgroup or 0)) for m in _TOKEN.finditer(text) if m.lastgroup]


def parse_rule(text: str) -> Rule:
    """The rule in `text`; RuleError naming the rule, what is wrong and the form a rule takes."""
    tokens = _tokens(str(text))
    at = 0

    def fail(why: str) -> RuleError:
        return RuleError(f'rule "{text}": {why}; {RULE_FORM}')

    def take() -> tuple[str, str]:
        nonlocal at
        token = tokens[at] if at < len(tokens) else ("end", "")
        at += 1
        return token

    def shown(token: tuple[str, str]) -> str:
        return "the end" if token[0] == "end" else f"'{token[1]}'"

    def objective(after: str) -> str:
        kind, value = token = take()
        if kind != "word" or value in ("where", "and", "best", "min", "max"):
            raise fail(f"expected an objective after {after}, got {shown(token)}")
        return value

    def number(after: str) -> float:
        sign = 1.0
        token = take()
        if token[0] == "sign":
            sign = -1.0 if token[1] == "-" else 1.0
            token = take()
        if token[0] != "num":
            raise fail(f"expected a number after {after}, got {shown(token)}")
        return sign * float(token[1])

    if not tokens:
        raise fail("is empty")
    kind, goal = first = take()
    if kind != "word" or goal not in ("min", "max"):
        raise fail(f"starts with {shown(first)}, not min or max")
    target = objective(f"'{goal}'")
    conditions = []
    token = take()
    if token[0] != "end":
        if token != ("word", "where"):
            raise fail(f"expected 'where' or the end after {target}, got {shown(token)}")
        while True:
            name = objective("'where'" if not conditions else "'and'")
            op = take()
            if op[0] != "op":
                raise fail(f"expected one of {', '.join(OPS)} after {name}, got {shown(op)}")
            peek = tokens[at] if at < len(tokens) else ("end", "")
            if peek == ("word", "best"):
                take()
                offset = 0.0
                if at < len(tokens) and tokens[at][0] == "sign":
                    sign = -1.0 if take()[1] == "-" else 1.0
                    offset = sign * number(f"'best {'-' if sign < 0 else '+'}'")
                conditions.append(Condition(name, op[1], offset, True))
            elif peek[0] in ("num", "sign"):
                conditions.append(Condition(name, op[1], number(f"'{op[1]}'"), False))
            else:
                raise fail(
                    f"expected best, best - X, best + X or a number after '{op[1]}', got {shown(peek)}"
                )
            token = take()
            if token[0] == "end":
                break
            if token != ("word", "and"):
                raise fail(f"expected 'and' or the end after {conditions[-1]}, got {shown(token)}")
    return Rule(str(text), goal, target, tuple(conditions))


def apply_rule(rule: Rule | str, study) -> Any:
    """The complete trial the rule picks (ties as `named_points`: a front member first). RuleError for an
    objective no trial recorded or whose direction `best` cannot know; AgeclsError when no trial meets it."""
    rule = parse_rule(rule) if isinstance(rule, str) else rule
    names, dirs = objective_names(study), directions(study)
    trials = complete_trials(study)
    known = set(dirs) | {n for t in trials for n in trial_values(t, names)}
    for name in rule.names():
        if name not in known:
            valid = ", ".join(sorted(known)) or "none (no complete trial)"
            raise RuleError(
                f'rule "{rule.text}": {name} is not an objective of study {study.study_name!r}; '
                f"valid: {valid}"
            )
    candidates = [t for t in trials if all(n in trial_values(t, names) for n in rule.names())]
    bests = {}
    for cond in (c for c in rule.conditions if c.best):
        direction = dirs.get(cond.objective) or KNOWN_DIRECTIONS.get(cond.objective)
        if direction is None:
            raise RuleError(
                f'rule "{rule.text}": the direction of {cond.objective} is unknown, so is its best; '
                "bound it by a number"
            )
        values = [trial_values(t, names)[cond.objective] for t in candidates]
        bests[cond.objective] = (max if direction == "maximize" else min)(values) if values else math.nan
    meeting = [
        t
        for t in candidates
        if all(
            c.holds(trial_values(t, names)[c.objective], bests.get(c.objective, math.nan))
            for c in rule.conditions
        )
    ]
    front = {t.number for t in pareto_front(study)}
    chosen = _pick(meeting, rule.objective, "maximize" if rule.goal == "max" else "minimize", names, front)
    if chosen is None:
        bounds = "; ".join(
            f"{c} = {c.bound(bests[c.objective]):.6g}" if c.best else str(c) for c in rule.conditions
        )
        raise AgeclsError(
            f'rule "{rule.text}": no complete trial of study {study.study_name!r} meets it '
            f"({len(candidates)} complete trials; {bounds or 'no conditions'})"
        )
    return chosen


# -- the front as a table ---------------------------------------------------------------------------------
def _group_scores(
    preds: np.ndarray, target: np.ndarray, groups: np.ndarray, n_groups: int, k: int
) -> np.ndarray:
    """Macro-F1 within each group of each row of (resamples, faces) arrays: (resamples, groups), NaN where a
    resample drew no face of a group. A class absent from a group's truth and predictions is left out of
    its average (as `agecls.metrics.stage_report`)."""
    r = preds.shape[0]
    base = ((np.arange(r)[:, None] * n_groups + groups) * k).ravel()
    size = r * n_groups * k
    true = np.bincount(base + target.ravel(), minlength=size).reshape(r, n_groups, k)
    pred = np.bincount(base + preds.ravel(), minlength=size).reshape(r, n_groups, k)
    hits = (preds == target).ravel().astype(float)
    tp = np.bincount(base + target.ravel(), weights=hits, minlength=size).reshape(r, n_groups, k)
    denom = true + pred
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    scores = f1.sum(axis=2) / np.maximum(present.sum(axis=2), 1)
    scores[true.sum(axis=2) == 0] = np.nan
    return scores


def group_bootstrap(
    preds, target, groups, k: int, n: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """(point, lo, hi) of the fairness gap (largest minus smallest group macro-F1, groups with at least one
    face) and of the worst group's macro-F1; the faces are resampled with replacement `n` times."""
    p, t, g = (np.asarray(a, dtype=np.int64) for a in (preds, target, groups))
    n_groups = int(g.max()) + 1
    point = _group_scores(p[None], t[None], g[None], n_groups, k)[0]
    stats = [_group_scores(p[rows], t[rows], g[rows], n_groups, k) for rows in _resamples(len(t), n, seed)]
    scores = np.concatenate(stats)
    gap, worst = np.nanmax(scores, axis=1) - np.nanmin(scores, axis=1), np.nanmin(scores, axis=1)
    q = [alpha / 2, 1 - alpha / 2]
    return {
        "gap": (float(np.nanmax(point) - np.nanmin(point)), *map(float, np.quantile(gap, q))),
        "worst": (float(np.nanmin(point)), *map(float, np.quantile(worst, q))),
    }


def _face_groups(table: pd.DataFrame, attr: str) -> np.ndarray | None:
    """Each face's group code for `attr` (-1 unknown): a multitask run's label column, else the UTKFace
    file name in `path`; None when neither is there."""
    from agecls.data.records import DataError, parse_utkface_name

    for column in (f"label_{attr}", attr):
        if column in table:
            return table[column].fillna(-1).to_numpy(dtype=np.int64)
    if "path" not in table:
        return None
    codes = []
    for path in table["path"].astype(str):
        try:
            value = getattr(parse_utkface_name(path), attr)
        except DataError:
            return None
        codes.append(-1 if value is None else value)
    return np.asarray(codes, dtype=np.int64)


def validation_intervals(
    run_dir: Path, objectives: Sequence[str], n: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Bootstrap 95% intervals on validation from the run's predictions_val.csv: `val/macro_f1_lo|_hi`, and
    for each fairness objective among `objectives` its `_lo|_hi`; {} when the file is missing."""
    path = Path(run_dir) / "predictions_val.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    results = Path(run_dir) / "results.json"
    names = json.loads(results.read_text()).get("class_names") if results.is_file() else None
    suffix, attr = "", None
    if "label" not in table:  # multitask: the objective attribute's columns
        attr = _objective_attribute(Path(run_dir))
        suffix = f"_{attr}"
        names = names.get(attr) if isinstance(names, dict) else None
    if f"label{suffix}" not in table or f"pred{suffix}" not in table:
        return {}
    known = (table[f"label{suffix}"] >= 0).to_numpy()
    target = table[f"label{suffix}"].to_numpy()[known]
    preds = table[f"pred{suffix}"].to_numpy()[known]
    if not len(target):
        return {}
    k = len(names) if names else int(max(target.max(), preds.max())) + 1
    out: dict[str, float] = {"val_faces": float(len(target))}
    _, lo, hi = bootstrap_ci(preds, target, k, n=n, seed=seed)
    out.update({f"{F1}_lo": lo, f"{F1}_hi": hi})
    for name in objectives:
        if not (name.startswith(GAP) or name.startswith(WORST)):
            continue
        group_attr = name.rsplit("_", 1)[-1]
        codes = _face_groups(table, group_attr)
        if codes is None:
            continue
        codes = codes[known]
        have = codes >= 0
        if not have.any():
            continue
        got = group_bootstrap(preds[have], target[have], codes[have], k, n=n, seed=seed)
        _, lo, hi = got["gap" if name.startswith(GAP) else "worst"]
        out.update({f"{name}_lo": lo, f"{name}_hi": hi})
    return out


def _objective_attribute(run_dir: Path) -> str:
    """The run's objective attribute (task.objective of its config.yaml; `age` when it has none)."""
    from omegaconf import OmegaConf

    config = run_dir / "config.yaml"
    if config.is_file():
        value = OmegaConf.select(OmegaConf.load(config), "task.objective", default=None)
        if value:
            return str(value)
    return "age"


def pareto_table(study, n_boot: int = 1000, seed: int = 0, rule: Rule | None = None) -> pd.DataFrame:
    """One row per front trial: `trial`, `named` (its aliases), each objective, the validation intervals
    (`<objective>_lo|_hi`, n_boot=0: none), the params, `mlflow_run_id`, `run_dir`; by the first
    objective, best first."""
    names, dirs = objective_names(study), directions(study)
    named: dict[int, list[str]] = {}
    for alias, trial in named_points(study).items():
        named.setdefault(trial.number, []).append(alias)
    if rule is not None:
        named.setdefault(apply_rule(rule, study).number, []).append("rule")
    rows = []
    for t in pareto_front(study):
        run_dir = t.user_attrs.get("run_dir")
        intervals = (
            validation_intervals(Path(str(run_dir)), names, n_boot, seed) if run_dir and n_boot else {}
        )
        row: dict[str, Any] = {"trial": t.number, "named": ",".join(named.get(t.number, []))}
        values = trial_values(t, names)
        for name in names:
            row[name] = values.get(name)
            if f"{name}_lo" in intervals:
                row[f"{name}_lo"], row[f"{name}_hi"] = intervals[f"{name}_lo"], intervals[f"{name}_hi"]
        if "val_faces" in intervals:
            row["val_faces"] = int(intervals["val_faces"])
        row.update(t.params)
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id")
        row["run_dir"] = run_dir
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    first = names[0]
    return table.sort_values([first, "trial"], ascending=[dirs[first] == "minimize", True]).reset_index(
        drop=True
    )


def pareto_plot(study, path: Path) -> Path:
    """The study's trials in objective space with the front marked (Optuna's plot_pareto_front; the first
    three objectives when it has more), the named points labelled on a two-objective plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    names = objective_names(study)
    shown = names[:3]
    targets = None if len(names) <= 3 else (lambda t: tuple(t.values[:3]))
    ax = ovm.plot_pareto_front(study, target_names=shown, targets=targets)
    fig = ax.figure
    if len(shown) == 2:
        for alias, trial in named_points(study).items():
            x, y = trial.values[0], trial.values[1]
            ax.annotate(
                f"{alias} (trial {trial.number})",
                (x, y),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
    fig.set_size_inches(8, 6)
    front = pareto_front(study)
    ax.set_title("")
    ax.set_title(f"Pareto front: {len(front)} of {len(complete_trials(study))} complete trials", loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
