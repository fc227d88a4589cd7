"""Single-attribute classification: which label column a task reads, its classes, and its loss weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GENDER_NAMES = ("male", "female")
ETHNICITY_NAMES = ("white", "black", "asian", "indian", "other")
CLASS_WEIGHTING = ("none", "one_minus_freq", "inverse_freq")


@dataclass(frozen=True)
class ClassificationTask:
    """One categorical target (`age` binned, `gender` or `ethnicity`) scored with macro-F1."""

    target: str
    class_names: tuple[str, ...]
    label_smoothing: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def class_weights(labels: np.ndarray, num_classes: int, scheme: str) -> list[float] | None:
    """Loss weights from training-label counts: 1 - count/total (dissertation) or normalised 1/count."""
    if scheme not in CLASS_WEIGHTING:
        raise ValueError(f"sampler.class_weights={scheme!r}; valid: {', '.join(CLASS_WEIGHTING)}")
    if scheme == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if scheme == "one_minus_freq":
        return (1.0 - counts / counts.sum()).tolist()
    safe = np.where(counts > 0, counts, 1.0)
    return (counts.sum() / (num_classes * safe)).tolist()
