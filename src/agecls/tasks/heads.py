"""Output heads: how one attribute's raw model outputs become a loss, a decoded class and class probabilities.

Every head is scored the same way, on its decoded class (an age bin for age heads), so a sweep can compare
them with one bin macro-F1. `task.head` picks the age head:

- `classification`: one logit per class, cross-entropy (label smoothing, optional class weights).
- `coral`: ordinal over the K bins (Cao et al. 2020): one score shared by K-1 "age > bin k" tasks, each with
  its own bias; binary cross-entropy per task; decoded bin = number of tasks with P > 0.5.
- `corn`: ordinal (Shi et al. 2021): K-1 independent logits, task k trained only on faces above bin k-1
  (conditional probabilities); P(age > bin k) = product of the first k+1 sigmoids; decoded as for CORAL.
- `regression`: one output, the exact age standardised with the training split's mean and std; L1,
  smooth-L1 or MSE loss (`task.regression_loss`); decoded by rounding the predicted age (clipped to the
  bins' range) and mapping it to its bin. Probabilities over bins are one-hot on the decoded bin.
- `label_distribution` (DLDL, Gao et al. 2017): softmax over every single year min_age..max_age, trained
  with KL divergence to a Gaussian of std `task.ldl_sigma` years around the true age; the predicted age is
  the distribution's expectation, decoded into its bin. Probabilities over bins are the year distribution
  summed within each bin (their argmax can, for a bimodal output, differ from the decoded bin).

`regression` and `label_distribution` predict years and also report the mean absolute error (MAE).

`Head.average` combines the logits of several views of the same faces (flip test-time augmentation,
`augment.tta=flip`) into logits every other method reads as usual: heads whose prediction is a softmax
(classification, label_distribution) average the probabilities (returned as their logarithm); the others
average the logits (coral: the one shared score, so the result is still a CORAL output; corn: each
conditional log-odds; regression: the standardised age, so the predicted age is the views' mean).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agecls.data.bins import AgeBins

AGE_HEADS = ("classification", "coral", "corn", "regression", "label_distribution")
REGRESSION_LOSSES = ("l1", "smooth_l1", "mse")


class Head(nn.Module):
    """One attribute's output layer semantics. `forward(raw)` turns the model's `out_features` outputs into
    the head's logits; `loss`, `decode` (class index), `proba` ((N, classes)) and, where `predicts_years`,
    `years` read those logits."""

    predicts_years = False  # also predicts exact age (years): needs the exact-age target, reports MAE

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a head needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def loss(self, logits: torch.Tensor, target: torch.Tensor, years: torch.Tensor | None = None):
        raise NotImplementedError

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        return self.proba(logits).argmax(dim=1)

    def proba(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def years(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not predict an exact age")

    def average(self, views: torch.Tensor) -> torch.Tensor:
        """(N, out) logits that combine (V, N, out) logits of V views of the same faces: their mean."""
        return views.mean(dim=0)


def _mean_softmax_logits(views: torch.Tensor) -> torch.Tensor:
    """Log of the mean of the views' softmax probabilities: logits whose softmax is that mean."""
    return torch.logsumexp(views.log_softmax(dim=-1), dim=0) - math.log(views.shape[0])


class ClassificationHead(Head):
    """Softmax over the classes; cross-entropy with label smoothing and optional per-class weights."""

    def __init__(
        self, num_classes: int, label_smoothing: float = 0.0, class_weights: list[float] | None = None
    ) -> None:
        super().__init__(num_classes)
        self.label_smoothing = float(label_smoothing)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        if weight is not None and len(weight) != num_classes:
            raise ValueError(f"{len(weight)} class weights for {num_classes} classes")
        # Not persistent: rebuilt from the checkpoint's hyperparameters, so state dicts hold only the model.
        self.register_buffer("weight", weight, persistent=False)

    @property
    def out_features(self) -> int:
        return self.num_classes

    def loss(self, logits, target, years=None):
        return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)

    def decode(self, logits):
        return logits.argmax(dim=1)

    def proba(self, logits):
        return logits.softmax(dim=1)

    def average(self, views):
        """The views' mean class probabilities (as log-probabilities; cross-entropy reads them as logits)."""
        return _mean_softmax_logits(views)


def _levels(target: torch.Tensor, tasks: int) -> torch.Tensor:
    """(N, K-1) binary "class > k" targets of ordinal labels."""
    return (target.unsqueeze(1) > torch.arange(tasks, device=target.device)).float()


def _bins_from_exceedance(exceed: torch.Tensor) -> torch.Tensor:
    """(N, K) class probabilities from (N, K-1) P(class > k), made non-increasing first."""
    exceed = torch.cummin(exceed, dim=1).values
    ones = torch.ones_like(exceed[:, :1])
    upper = torch.cat([ones, exceed], dim=1)
    lower = torch.cat([exceed, torch.zeros_like(ones)], dim=1)
    return (upper - lower).clamp_min(0.0)


class CoralHead(Head):
    """CORAL: the model gives one score g(x); logit k = g(x) + b_k with K-1 learned biases (rank-consistent:
    shared weights, independent biases)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        k = num_classes - 1
        self.bias = nn.Parameter(torch.arange(k, 0, -1, dtype=torch.float32) / k)

    @property
    def out_features(self) -> int:
        return 1

    def forward(self, raw):
        return raw[:, :1] + self.bias

    def loss(self, logits, target, years=None):
        levels = _levels(target, self.num_classes - 1)
        per_task = F.binary_cross_entropy_with_logits(logits, levels, reduction="none")
        return per_task.sum(dim=1).mean()

    def decode(self, logits):
        return (logits > 0).sum(dim=1)

    def proba(self, logits):
        return _bins_from_exceedance(torch.sigmoid(logits))


class CornHead(Head):
    """CORN: K-1 conditional logits; task k learns P(class > k | class > k-1) on faces with class >= k."""

    @property
    def out_features(self) -> int:
        return self.num_classes - 1

    def loss(self, logits, target, years=None):
        total, count = logits.new_zeros(()), 0
        for k in range(self.num_classes - 1):
            rows = target >= k
            n = int(rows.sum())
            if n == 0:
                continue
            label = (target[rows] > k).float()
            total = total + F.binary_cross_entropy_with_logits(logits[rows, k], label, reduction="sum")
            count += n
        return total / max(count, 1)

    def exceedance(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K-1) P(class > k): cumulative products of the conditional probabilities."""
        return torch.cumprod(torch.sigmoid(logits), dim=1)

    def decode(self, logits):
        return (self.exceedance(logits) > 0.5).sum(dim=1)

    def proba(self, logits):
        return _bins_from_exceedance(self.exceedance(logits))


class _YearsHead(Head):
    """A head predicting exact age in years, decoded into the configured bins."""

    predicts_years = True

    def __init__(self, bins: AgeBins) -> None:
        super().__init__(bins.n)
        self.min_age, self.max_age = int(bins.min_age), int(bins.max_age)
        inner = torch.as_tensor(bins.edges[1:-1], dtype=torch.float32)
        self.register_buffer("inner_edges", inner, persistent=False)

    def to_bins(self, years: torch.Tensor) -> torch.Tensor:
        """Bin of each (rounded, clipped) age, as AgeBins.index would give it."""
        whole = years.round().clamp(self.min_age, self.max_age)
        return torch.bucketize(whole, self.inner_edges.to(whole.dtype), right=True)

    def decode(self, logits):
        return self.to_bins(self.years(logits))


class RegressionHead(_YearsHead):
    """One output: the age standardised as (age - mean) / std (training-split statistics)."""

    def __init__(self, bins: AgeBins, mean: float, std: float, loss: str = "l1") -> None:
        super().__init__(bins)
        if loss not in REGRESSION_LOSSES:
            raise ValueError(f"task.regression_loss={loss!r}; valid: {', '.join(REGRESSION_LOSSES)}")
        if not std > 0:
            raise ValueError(f"age std must be > 0 for the regression head, got {std}")
        self.mean, self.std, self.loss_name = float(mean), float(std), loss

    @property
    def out_features(self) -> int:
        return 1

    def forward(self, raw):
        return raw[:, :1]

    def loss(self, logits, target, years=None):
        if years is None:
            raise ValueError("the regression head needs the exact age of every face")
        scaled = (years.float() - self.mean) / self.std
        fn = {"l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss}[self.loss_name]
        return fn(logits[:, 0], scaled)

    def years(self, logits):
        return (logits[:, 0] * self.std + self.mean).clamp(self.min_age, self.max_age)

    def proba(self, logits):
        return F.one_hot(self.decode(logits), self.num_classes).float()


class LabelDistributionHead(_YearsHead):
    """Softmax over single years min_age..max_age, trained towards a Gaussian around the true age (KL)."""

    def __init__(self, bins: AgeBins, sigma: float = 2.0) -> None:
        super().__init__(bins)
        if not sigma > 0:
            raise ValueError(f"task.ldl_sigma={sigma!r}: must be > 0 (years)")
        self.sigma = float(sigma)
        ages = torch.arange(self.min_age, self.max_age + 1, dtype=torch.float32)
        self.register_buffer("ages", ages, persistent=False)
        member = torch.as_tensor(bins.index(ages.long().numpy()))
        self.register_buffer("membership", F.one_hot(member, bins.n).float(), persistent=False)

    @property
    def out_features(self) -> int:
        return self.max_age - self.min_age + 1

    def target_distribution(self, years: torch.Tensor) -> torch.Tensor:
        """(N, years) Gaussian label distributions around each true age, normalised over the year range."""
        d = -((self.ages.unsqueeze(0) - years.float().unsqueeze(1)) ** 2) / (2 * self.sigma**2)
        return d.softmax(dim=1)

    def loss(self, logits, target, years=None):
        if years is None:
            raise ValueError("the label_distribution head needs the exact age of every face")
        return F.kl_div(logits.log_softmax(dim=1), self.target_distribution(years), reduction="batchmean")

    def years(self, logits):
        return logits.softmax(dim=1) @ self.ages

    def proba(self, logits):
        return logits.softmax(dim=1) @ self.membership

    def average(self, views):
        """The views' mean year distribution (as log-probabilities): its expectation is the mean of theirs."""
        return _mean_softmax_logits(views)


def build_head(
    kind: str,
    num_classes: int,
    *,
    target: str = "age",
    bins: AgeBins | None = None,
    label_smoothing: float = 0.0,
    class_weights: list[float] | None = None,
    age_stats: dict[str, float] | None = None,
    regression_loss: str = "l1",
    ldl_sigma: float = 2.0,
) -> Head:
    """The head `task.head` names, for an attribute with `num_classes` classes (age: the bins' count)."""
    if kind not in AGE_HEADS:
        raise ValueError(f"task.head={kind!r}; valid: {', '.join(AGE_HEADS)}")
    if kind == "classification":
        return ClassificationHead(num_classes, label_smoothing, class_weights)
    if target != "age":
        raise ValueError(f"task.head={kind!r} is an age head; the {target} task uses classification")
    if class_weights:
        raise ValueError(
            f"sampler.class_weights weighs the cross-entropy of classification heads; task.head={kind!r} "
            "has none (use sampler.class_weights=none, or sampler=weighted for balanced draws)"
        )
    if kind == "coral":
        return CoralHead(num_classes)
    if kind == "corn":
        return CornHead(num_classes)
    if bins is None:
        raise ValueError(f"task.head={kind!r} needs the age bins")
    if kind == "regression":
        stats = age_stats or {
            "mean": (bins.min_age + bins.max_age) / 2,
            "std": (bins.max_age - bins.min_age) / 2,
        }
        return RegressionHead(bins, stats["mean"], stats["std"], regression_loss)
    return LabelDistributionHead(bins, ldl_sigma)


def head_predicts_years(task: Any) -> bool:
    """Whether the task's age head predicts exact age (and so reads the exact-age target)."""
    return str(task.get("head", "classification")) in ("regression", "label_distribution")
