"""What a task config asks for: which attributes a run predicts, the target columns its batches carry,
each attribute's classes, loss weights and the objective attribute.

A single task (`task=age|gender|ethnicity`) predicts `task.target`; `task=multitask` predicts every
attribute of `task.attributes` from one shared trunk. Batches carry one integer target column per
attribute (age: its bin; -1 where a face lacks the attribute), plus `age_years` (the exact age) when the
age head predicts years. A single classification task keeps a 1-D target, as before.
"""

from __future__ import annotations

from typing import Any

from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES
from agecls.tasks.heads import head_predicts_years

ATTRIBUTES = ("age", "gender", "ethnicity")
YEARS = "age_years"  # target column: the exact age in years


def is_multitask(task: Any) -> bool:
    """Whether a task config predicts several attributes (`task.attributes` set)."""
    return task.get("attributes") is not None


def task_attributes(task: Any) -> list[str]:
    """Attributes a task predicts, validated: `task.attributes` (multitask) or `[task.target]`."""
    attrs = [str(a) for a in task.attributes] if is_multitask(task) else [str(task.target)]
    unknown = [a for a in attrs if a not in ATTRIBUTES]
    if unknown or not attrs or len(set(attrs)) != len(attrs):
        where = "task.attributes" if is_multitask(task) else "task.target"
        raise ValueError(f"{where}={attrs}: give distinct attributes among {', '.join(ATTRIBUTES)}")
    return attrs


def target_columns(task: Any) -> list[str]:
    """Target columns of a batch, in order: the attributes, then `age_years` if the age head needs it."""
    attrs = task_attributes(task)
    return attrs + [YEARS] if "age" in attrs and head_predicts_years(task) else attrs


def attribute_classes(attr: str, age_labels: list[str]) -> list[str]:
    """Class names of one attribute; age uses the configured bins."""
    return list({"age": tuple(age_labels), "gender": GENDER_NAMES, "ethnicity": ETHNICITY_NAMES}[attr])


def task_class_names(task: Any, age_labels: list[str]) -> dict[str, list[str]]:
    """{attribute: class names} of every attribute the task predicts."""
    return {a: attribute_classes(a, age_labels) for a in task_attributes(task)}


def loss_weights(task: Any) -> dict[str, float]:
    """Per-attribute loss weights (`task.weights`, default 1 each); single tasks weigh their one loss 1."""
    attrs = task_attributes(task)
    given = dict(task.get("weights") or {}) if is_multitask(task) else {}
    unknown = sorted(set(given) - set(attrs))
    if unknown:
        raise ValueError(f"task.weights has {unknown}, not among task.attributes={attrs}")
    weights = {a: float(given.get(a, 1.0)) for a in attrs}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"task.weights={weights}: weights must be >= 0, at least one > 0")
    return weights


def objective_attribute(task: Any) -> str:
    """The attribute whose scores are also logged unprefixed (`val/macro_f1`): `task.objective` (multitask)
    or the single task's target."""
    attrs = task_attributes(task)
    if not is_multitask(task):
        return attrs[0]
    objective = str(task.get("objective") or attrs[0])
    if objective not in attrs:
        raise ValueError(f"task.objective={objective!r}; valid: one of task.attributes {attrs}")
    return objective
