"""Several checkpoints scored as one model (`agecls-eval ckpt=[a,b,c]` or `ensemble.study=NAME`).

Members must predict the same thing from the same input (`prediction_spec`: task attributes, class names,
age bins, image size, crop margin, colour mode, normalisation). Each member predicts class probabilities
(`FaceClassifier.predict_proba`) on its own normalisation of the one decoded folder; the ensemble's
probabilities are their equal-weight mean. Its decoded class follows the members' heads (`decision_rule`),
so that an ensemble of one checkpoint decodes exactly as that checkpoint does:

- `argmax`: the class of highest mean probability (classification heads, and mixed kinds of age head);
- `ordinal_median`: coral / corn age heads: the bin where the mean distribution's cumulative probability
  passes 1/2 (the number of bins k with mean P(age > bin k) > 0.5), as these heads decode one model;
- `mean_years`: regression / label_distribution age heads: the members' predicted ages (years) averaged,
  then put in their bin, as these heads decode one model (a regression head's probabilities are one-hot,
  so averaging them would only be a vote); the ensemble's MAE is that of the mean age.

`study_members` picks the checkpoints of an Optuna study's best `top_k` COMPLETE trials by their objective
(the validation value the study optimised, in its direction; never a test score).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from agecls.errors import UsageError
from agecls.evaluation.scoring import EvalError, score_attributes

RULES = ("argmax", "ordinal_median", "mean_years")


def prediction_spec(module) -> dict[str, Any]:
    """What a checkpoint predicts and how it reads an image: the values every ensemble member must share
    ({key: value}; class names per attribute as `class_names.<attribute>`).

    `data.normalize` is compared as the setting, not the statistics it resolved to: each member normalises
    the shared un-normalised batches with its own checkpoint's `input_stats` (`Member.inputs`), so members
    whose `dataset` statistics differ (other train splits) still see their inputs as in training."""
    from agecls.data.bins import AgeBins

    cfg = module.cfg
    normalize = cfg.data.get("normalize", "none")
    if isinstance(normalize, DictConfig | ListConfig):
        normalize = OmegaConf.to_container(normalize, resolve=True)
    spec: dict[str, Any] = {"task attributes": list(module.attributes)}
    spec.update({f"class_names.{a}": list(module.class_names[a]) for a in module.attributes})
    age = "age" in module.attributes
    spec["bins"] = [list(r) for r in AgeBins.from_config(cfg.bins).ranges] if age else None
    spec.update(
        {
            "data.image_size": int(cfg.data.image_size),
            "data.crop_margin": int(cfg.data.get("crop_margin") or 0),
            "data.grayscale": bool(cfg.data.grayscale),
            "data.normalize": normalize,
        }
    )
    return spec


def check_members(paths: Sequence[Path], modules: Sequence[Any]) -> None:
    """EvalError naming the first member that predicts differently from the first one, the key and both
    values."""
    first = prediction_spec(modules[0])
    for path, module in zip(paths[1:], modules[1:], strict=True):
        spec = prediction_spec(module)
        for key, value in first.items():
            if spec.get(key) != value:
                raise EvalError(
                    f"ensemble member {path} does not predict like the first member {paths[0]}: {key} is "
                    f"{spec.get(key)!r} there and {value!r} in the first; an ensemble's members must share "
                    f"{', '.join(first)}"
                )


def decision_rule(heads: Sequence[Any]) -> str:
    """How the ensemble decodes one attribute from its members' heads (one of RULES; module docstring)."""
    from agecls.tasks.heads import CoralHead, CornHead

    if all(h.predicts_years for h in heads):
        return "mean_years"
    if all(isinstance(h, CoralHead | CornHead) for h in heads):
        return "ordinal_median"
    return "argmax"


def decide(rule: str, proba: torch.Tensor, years: torch.Tensor | None = None, head=None) -> torch.Tensor:
    """(N,) decoded class of (N, classes) probabilities by `rule`; `mean_years` bins `years` with `head`
    (a years head: its `to_bins`)."""
    if rule == "mean_years":
        return head.to_bins(years)
    if rule == "ordinal_median":
        exceed = 1.0 - proba.cumsum(dim=1)[:, :-1]  # P(class > k) of the distribution
        return (exceed > 0.5).sum(dim=1)
    if rule == "argmax":
        return proba.argmax(dim=1)
    raise ValueError(f"unknown ensemble decision rule {rule!r}; valid: {', '.join(RULES)}")


def member_outputs(module, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{attribute: {"proba", and "years" for heads predicting exact age}} of one member on input x."""
    probs = module.predict_proba(x)
    years = module.predict_years(x) if any(module.heads[a].predicts_years for a in module.attributes) else {}
    return {a: {"proba": probs[a], **({"years": years[a]} if a in years else {})} for a in module.attributes}


def mean_outputs(outputs: Sequence[dict[str, dict[str, torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """Equal-weight mean over members of each attribute's probabilities (and years, when every member
    predicts them)."""
    mean: dict[str, dict[str, torch.Tensor]] = {}
    for attr in outputs[0]:
        mean[attr] = {"proba": torch.stack([o[attr]["proba"] for o in outputs]).mean(dim=0)}
        if all("years" in o[attr] for o in outputs):
            mean[attr]["years"] = torch.stack([o[attr]["years"] for o in outputs]).mean(dim=0)
    return mean


def ensemble_proba(modules: Sequence[Any], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{attribute: (N, classes)} mean of the members' `predict_proba` on the same input x."""
    return {a: got["proba"] for a, got in mean_outputs([member_outputs(m, x) for m in modules]).items()}


@dataclass
class Member:
    """One loaded ensemble checkpoint and its input normalisation (per-channel tensors broadcasting over a
    (B, C, H, W) batch, e.g. `Preprocess.stats()`, or None)."""

    path: Path
    module: Any
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x (0..1 scale) normalised as this member's training run did (the loaders' `normalize_input`)."""
        from agecls.data.datamodule import normalize_input

        return normalize_input(x, self.mean, self.std)


@torch.no_grad()
def collect(
    members: Sequence[Member], loader, columns: Sequence[str], device: str
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, dict[str, torch.Tensor]]], dict[str, str]]:
    """Every batch of `loader` ((un-normalised x, targets in `columns` order) predicted by every member:
    (the ensemble's, each member's) in `FaceClassifier.collect`'s form ({attribute: {"preds", "labels",
    "years" and "true_years" where predicted}}) and {attribute: decision rule}. Each member is scored by
    the same rule as an ensemble of it alone."""
    from agecls.tasks.multitask import YEARS

    attributes = list(members[0].module.attributes)
    rules = {a: decision_rule([m.module.heads[a] for m in members]) for a in attributes}
    own = [{a: decision_rule([m.module.heads[a]]) for a in attributes} for m in members]
    parts: list[dict[str, dict[str, list[torch.Tensor]]]] = [{a: {} for a in attributes} for _ in members]
    ens: dict[str, dict[str, list[torch.Tensor]]] = {a: {} for a in attributes}
    for x, y in loader:
        x = x.to(device)
        targets = {columns[0]: y} if y.ndim == 1 else {c: y[:, i] for i, c in enumerate(columns)}
        outputs = []
        for i, m in enumerate(members):
            out = {
                a: {k: v.cpu() for k, v in d.items()}
                for a, d in member_outputs(m.module, m.inputs(x)).items()
            }
            outputs.append(out)
            for a in attributes:
                _add(parts[i][a], out[a], own[i][a], m.module.heads[a], targets, a, YEARS)
        mean = mean_outputs(outputs)
        for a in attributes:
            _add(ens[a], mean[a], rules[a], members[0].module.heads[a], targets, a, YEARS)
    cat = lambda d: {a: {k: torch.cat(v) for k, v in got.items()} for a, got in d.items()}  # noqa: E731
    return cat(ens), [cat(p) for p in parts], rules


def _add(into: dict, got: dict, rule: str, head, targets: dict, attr: str, years_column: str) -> None:
    years = got.get("years")
    into.setdefault("preds", []).append(decide(rule, got["proba"], years, head))
    into.setdefault("labels", []).append(targets[attr])
    if years is not None and years_column in targets:
        into.setdefault("years", []).append(years)
        into.setdefault("true_years", []).append(targets[years_column])


def report_block(
    ckpts: list[Path],
    per_member: list[dict[str, dict]],
    module,
    rules: dict[str, str],
    scored: dict[str, dict],
    study: dict[str, Any] | None,
    picked: list[Any],
) -> dict[str, Any]:
    """The report's `ensemble` block: members (checkpoint, own macro_f1/acc/mae, the study trial it came
    from) beside the ensemble's macro_f1, and how each attribute was decided."""
    members = []
    for i, (path, got) in enumerate(zip(ckpts, per_member, strict=True)):
        own = score_attributes(got, module.class_names)
        entry: dict[str, Any] = {"checkpoint": str(path.resolve())}
        entry.update(
            {k: own[module.objective][k] for k in ("macro_f1", "acc", "mae") if k in own[module.objective]}
        )
        if module.multitask:
            entry["attributes"] = {
                a: {k: d[k] for k in ("macro_f1", "acc", "mae") if k in d} for a, d in own.items()
            }
        if picked:
            entry.update(trial=picked[i].trial, value=picked[i].value, mlflow_run_id=picked[i].mlflow_run_id)
        members.append(entry)
    f1s = [m["macro_f1"] for m in members]
    macro_f1 = scored[module.objective]["macro_f1"]
    return {
        "n_members": len(members),
        "decision": rules,
        "macro_f1": macro_f1,
        "best_member_macro_f1": max(f1s),
        "mean_member_macro_f1": float(sum(f1s) / len(f1s)),
        "gain_over_best_member": macro_f1 - max(f1s),
        "members": members,
        "study": study,
    }


# ------------------------------------------------------------------------------------------ Optuna studies


@dataclass(frozen=True)
class StudyMember:
    """One trial picked from a study: its number, objective value, checkpoint and MLflow run."""

    trial: int
    value: float
    checkpoint: Path
    mlflow_run_id: str | None


def study_members(storage: str, name: str, top_k: int) -> list[StudyMember]:
    """The checkpoints (user attribute `checkpoint`) of the `top_k` COMPLETE trials of study `name` with the
    best objective value in the study's direction, best first (ties: lower trial number first).
    UsageError: no such storage or study (the study names there are listed), fewer than top_k complete
    trials; EvalError: a picked trial without a checkpoint file."""
    import optuna
    from optuna.trial import TrialState

    prefix = "sqlite:///"
    if storage.startswith(prefix) and not Path(storage[len(prefix) :]).is_file():
        raise UsageError(f"ensemble.storage={storage}: no such Optuna storage (the file does not exist)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        summaries = optuna.get_all_study_summaries(storage=storage, include_best_trial=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable storage is the user's argument
        raise UsageError(
            f"ensemble.storage={storage}: cannot open it ({type(exc).__name__}: {exc})"
        ) from None
    names = sorted(s.study_name for s in summaries)
    if name not in names:
        raise UsageError(
            f"ensemble.study={name}: no such study in {storage}; studies there: {', '.join(names) or 'none'}"
        )
    study = optuna.load_study(study_name=name, storage=storage)
    if len(study.directions) > 1:
        raise UsageError(
            f"ensemble.study={name}: a study of {len(study.directions)} objectives has no single ranking to "
            "take the top trials by; valid: a single-objective study, or ckpt=[A,B,...] with the "
            "checkpoints of the front trials you choose (pareto.csv lists them with their run folders)"
        )
    trials = study.get_trials(deepcopy=False)
    complete = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(float(t.value))
    ]
    if len(complete) < top_k:
        raise UsageError(
            f"ensemble.top_k={top_k}: study {name!r} has only {len(complete)} COMPLETE trial(s) with an "
            f"objective value (of {len(trials)} trials); give ensemble.top_k={max(len(complete), 1)} or less"
        )
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    ranked = sorted(complete, key=lambda t: (sign * float(t.value), t.number))[:top_k]
    picked = []
    for t in ranked:
        ckpt = t.user_attrs.get("checkpoint")
        if not ckpt:
            raise EvalError(f"trial {t.number} of study {name!r} records no checkpoint (user attribute)")
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            raise EvalError(
                f"trial {t.number} of study {name!r} (objective {t.value:.4g}): its checkpoint {path} is "
                "missing (moved or deleted?); list the checkpoints to use with ckpt=[a.ckpt,b.ckpt,...]"
            )
        picked.append(StudyMember(t.number, float(t.value), path, t.user_attrs.get("mlflow_run_id")))
    return picked
