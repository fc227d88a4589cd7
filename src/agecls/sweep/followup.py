"""What a single-objective study does once it holds its n_trials: the late-bloomer check and noise-aware
selection (docs/SWEEPS.md, "Noise-aware selection and late bloomers").

- `optuna.check_pruned: k`: the k PRUNED trials with the best value they last reported (ties: the lower
  number) are continued to trainer.max_epochs from their checkpoints/last.ckpt, each in a copy of its folder
  (`trial-NNNN-continued`) with its own MLflow run (tag `optuna.continued_from`). The result is the pruned
  trial's user attribute `continued`; one that beats the study's best COMPLETE value joins the study as a
  COMPLETE trial (user attribute `continued_from`), so the study can choose and register it.
- `optuna.reseed: {top, seeds}`: the `top` best COMPLETE trials are re-run with each seed, from their own
  config.yaml, as plain runs nested under the study's MLflow run (tag `optuna.reseed_of`), in
  `trial-NNNN-seed-S`; user attributes `reseeds`, `reseed_runs`, `seed_mean`, `seed_std` and, when the
  objective is a macro-F1, `ensemble_val` (the validation macro-F1 of the seeds' mean probabilities).
  `optuna.reseed.leader_seeds: [...]`: then the trial those seeds' means choose (the leader) runs on these
  seeds too, and the choice is made again over every seed each trial has (user attribute `leader_seeds`).

Follow-ups are plain `agecls-train` processes started through the study's executor, in its slots (CPU
processes, one per GPU, or Slurm jobs), not Optuna trials: the sampler and n_trials are untouched. A run
whose results.json exists is not run again, so re-running the study's command finishes what is missing.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from agecls.errors import UsageError
from agecls.study import fresh, set_finished_attrs
from agecls.sweep.selection import best_seed_run, chosen_trial, maximizes, selection_table, served
from agecls.sweep.stopping import stop_trials

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CONTINUED = "continued"  # suffix of a continued pruned trial's folder: trial-NNNN-continued


def followup_settings(cfg: DictConfig) -> tuple[int, list[int], int]:
    """(reseed top, reseed seeds, check_pruned) of the `optuna` block; UsageError naming a bad value, or a
    follow-up asked of a study with several objectives (a Pareto study picks its points differently)."""
    ocfg = cfg.optuna
    reseed = ocfg.get("reseed") or {}
    unknown = sorted(set(reseed) - {"top", "seeds", "leader_seeds"})
    if unknown:
        raise UsageError(
            f"optuna.reseed.{unknown[0]} is not a setting; valid: optuna.reseed.top, .seeds, .leader_seeds"
        )
    top, check = reseed.get("top", 0), ocfg.get("check_pruned", 0)
    for key, value in (("optuna.reseed.top", top), ("optuna.check_pruned", check)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{key}={value!r}; valid: a whole number >= 0 (0: off)")
    seeds = _seed_list(reseed.get("seeds"), "optuna.reseed.seeds", "[1, 2]")
    if top and not seeds:
        raise UsageError(f"optuna.reseed.top={top} with no optuna.reseed.seeds; valid: e.g. seeds: [1, 2]")
    metrics = (cfg.get("objective") or {}).get("metrics")
    if metrics is not None and len(metrics) >= 2:
        key = "optuna.reseed.top" if top else "optuna.check_pruned" if check else None
        if key:
            raise UsageError(
                f"{key}={top if top else check} with {len(metrics)} objectives (objective.metrics): a Pareto "
                f"study keeps every non-dominated trial rather than naming one best; valid: {key}=0"
            )
    return int(top), seeds, int(check)


def _seed_list(raw: Any, key: str, example: str) -> list[int]:
    """A seed list setting (one seed may stand alone); UsageError naming `key` unless distinct integers."""
    raw = raw or []
    seeds = list(raw) if not isinstance(raw, int | str) else [raw]
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"{key}={raw!r}; valid: a list of distinct whole numbers, e.g. {example}")
    return [int(s) for s in seeds]


def leader_seeds(cfg: DictConfig) -> list[int]:
    """`optuna.reseed.leader_seeds`: the seeds the leader (the trial chosen once the top trials are re-seeded)
    runs on besides; [] when `optuna.reseed.top` is 0 (no re-seeds, no leader: `top=0` turns the whole
    follow-up off, whatever a sweep file lists); UsageError naming a bad value."""
    top, seeds, _ = followup_settings(cfg)
    raw = (cfg.optuna.get("reseed") or {}).get("leader_seeds")
    more = _seed_list(raw, "optuna.reseed.leader_seeds", "[3, 4]")
    if set(more) & set(seeds):
        raise UsageError(
            f"optuna.reseed.leader_seeds={raw!r} repeats optuna.reseed.seeds={seeds}: the leader already ran "
            "those; valid: other seeds"
        )
    return more if top else []


def check_followups(cfg: DictConfig) -> None:
    """UsageError before the study starts when its follow-up settings cannot be used."""
    followup_settings(cfg)
    leader_seeds(cfg)


# -- running follow-up jobs ----------------------------------------------------------------------------------
@dataclass
class Job:
    """One follow-up `agecls-train` command and the folder it writes (results.json once it succeeded)."""

    name: str
    cmd: list[str]
    run_dir: Path

    def results(self) -> dict[str, Any] | None:
        path = self.run_dir / "results.json"
        return json.loads(path.read_text()) if path.is_file() else None


def run_jobs(executor: Any, slots: list[dict[str, str]], jobs: list[Job], label: str) -> None:
    """Run `jobs` through the study's executor, as many at once as it has slots; Ctrl-C stops them and is
    raised again (a re-run of the study's command runs again those without results.json)."""
    pending, running = list(jobs), {}
    try:
        while pending or running:
            for slot in range(len(slots)):
                if slot in running or not pending:
                    continue
                job = pending.pop(0)
                job.run_dir.mkdir(parents=True, exist_ok=True)
                log_path = job.run_dir / "process.log"
                running[slot] = (
                    job,
                    executor.start(job.cmd, slots[slot], log_path, job.name),
                    time.monotonic(),
                )
                log.info("%s %s started (slot %d); log %s", label, job.name, slot, log_path)
            for slot, (job, handle, started) in list(running.items()):
                if handle.done():
                    del running[slot]
                    ok = "finished" if job.results() is not None else "FAILED (no results.json)"
                    log.info("%s %s %s after %.0f s", label, job.name, ok, time.monotonic() - started)
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop_trials([handle for _, handle, _ in running.values()], graces=(20, 20, 20))
        log.warning("interrupted during the %ss; run the same command again to finish them", label)
        raise


def _quoted(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _tags_override(tags: dict[str, Any], prefix: str = "++") -> str:
    return prefix + "tracking.tags={" + ",".join(f"{k}:{_quoted(v)}" for k, v in tags.items()) + "}"


def trial_dir(trial, sweep_dir: Path) -> Path:
    """A trial's run folder (user attribute `run_dir`; else `trial-NNNN` of this sweep). Follow-ups write
    beside it (`trial-NNNN-continued`, `trial-NNNN-seed-S`), so a later session finds them there."""
    return Path(str(trial.user_attrs.get("run_dir") or sweep_dir / f"trial-{trial.number:04d}"))


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


# -- pruned trials continued to the end ----------------------------------------------------------------------
def pruned_candidates(study, k: int) -> list[Any]:
    """The k PRUNED trials to continue: best value last reported (at the pruning epoch) first, in the study's
    direction; ties and trials that reported nothing go by number."""
    from optuna.trial import TrialState

    sign = 1.0 if maximizes(study) else -1.0
    pruned = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if t.intermediate_values and "continued_from" not in t.user_attrs
    ]

    def last(t) -> float:
        value = t.intermediate_values[max(t.intermediate_values)]
        return sign * float(value) if _finite(value) else -math.inf

    return sorted(pruned, key=lambda t: (-last(t), t.number))[:k]


def _rebase(checkpoint: Path, old: Path, new: Path) -> None:
    """Point the paths a checkpoint's callback states hold (the best checkpoint of ModelCheckpoint) at the
    copied folder: the continued run then keeps the pruned run's best epoch as its best so far."""
    import torch

    from agecls.files import atomic_path

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    old_s, new_s = str(old), str(new)

    def swap(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(old_s):
            return new_s + value[len(old_s) :]
        if isinstance(value, dict):  # ModelCheckpoint's best_k_models: {path: score}
            return {swap(k): swap(v) for k, v in value.items()}
        return value

    state["callbacks"] = {k: swap(v) for k, v in (state.get("callbacks") or {}).items()}
    with atomic_path(checkpoint) as tmp:
        torch.save(state, tmp)


def prepare_continuation(trial, source: Path, target: Path, study_name: str, parent: str | None) -> bool:
    """Copy a pruned trial's folder to `target` for `trainer.resume` (once: an existing copy is a
    continuation started before, resumed from its own last.ckpt): its config.yaml made a plain run tagged
    `optuna.continued_from`, its run.json naming no MLflow run (the continuation records its own).
    False when the trial left no checkpoints/last.ckpt."""
    if target.is_dir():
        return True
    last = source / "checkpoints" / "last.ckpt"
    if not last.is_file():
        log.warning("pruned trial %d: %s does not exist; not continued", trial.number, last)
        return False
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("process.log", ".hydra"))
    config = OmegaConf.load(staging / "config.yaml")
    given = OmegaConf.select(config, "tracking.tags")
    tags = dict(OmegaConf.to_container(given)) if given else {}
    tags.update({"optuna.study": study_name, "optuna.continued_from": str(trial.number)})
    if parent:
        tags["mlflow.parentRunId"] = parent
    OmegaConf.update(config, "tracking.tags", tags, merge=False)
    OmegaConf.update(config, "tracking.run_name", f"trial {trial.number} continued")
    OmegaConf.update(config, "optuna.trial", None)
    OmegaConf.update(config, "optuna.parent_run_id", None)
    (staging / "config.yaml").write_text(OmegaConf.to_yaml(config))
    marker = staging / "run.json"
    if marker.is_file():
        state = json.loads(marker.read_text())
        state.pop("mlflow_run_id", None)
        state.update(status="pruned", continued_from=trial.number)
        marker.write_text(json.dumps(state, indent=2) + "\n")
    for ckpt in (staging / "checkpoints").glob("*.ckpt"):
        _rebase(ckpt, source.resolve(), target.resolve())
    staging.rename(target)
    return True


def check_pruned(
    study, cfg: DictConfig, executor: Any, slots: list[dict[str, str]], sweep_dir: Path, parent: str | None
) -> dict[str, Any]:
    """Continue `optuna.check_pruned` pruned trials to the end; promote those that beat the best COMPLETE
    value. Returns {"study/pruned_checked", "study/pruned_would_win", "values"}."""
    from optuna.trial import TrialState

    _, _, k = followup_settings(cfg)
    sign = 1.0 if maximizes(study) else -1.0
    pairs = []
    for trial in pruned_candidates(study, k):
        job = _continuation(study, cfg, trial, sweep_dir, parent)
        if job is not None:
            pairs.append((trial, job))
    _run_missing(executor, slots, [job for _, job in pairs], "continuation")
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if _finite(t.value) and "continued_from" not in t.user_attrs
    ]
    best = max((sign * float(t.value) for t in complete), default=-math.inf)
    promoted = {
        int(t.user_attrs["continued_from"])
        for t in study.get_trials(deepcopy=False)
        if "continued_from" in t.user_attrs
    }
    checked, winners = 0, []
    for trial, job in pairs:
        results = job.results()
        if results is None or not _finite(results.get("objective")):
            log.warning("pruned trial %d: its continuation has no result; see its process.log", trial.number)
            continue
        checked += 1
        value = float(results["objective"])
        continued = {
            "value": value,
            "epochs": int(results["epochs_trained"]),
            "run_dir": str(results["run_dir"]),
            "mlflow_run_id": results.get("mlflow_run_id"),
        }
        set_finished_attrs(study, trial, {"continued": continued})
        if sign * value <= best:
            continue
        winners.append((trial.number, value))
        if trial.number not in promoted:
            _promote(study, trial, value, results)
    shown = ", ".join(f"trial {n}: {v:.4f}" for n, v in winners)
    line = (
        f"{checked} of {len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))} pruned trials "
        f"continued to the end; {len(winners)} would have won"
        + (f" (values {shown}; best complete {sign * best:.4f})" if winners else "")
    )
    log.info("%s", line)
    print(f"study {study.study_name}: {line}")
    summary = {
        "study/pruned_checked": checked,
        "study/pruned_would_win": len(winners),
        "values": dict(winners),
    }
    study.set_user_attr("pruned_checked", checked)
    study.set_user_attr("pruned_would_win", len(winners))
    return summary


def _continuation(study, cfg: DictConfig, trial, sweep_dir: Path, parent: str | None) -> Job | None:
    """The run continuing pruned `trial` in `trial-NNNN-continued`; None when it left no checkpoint."""
    source = trial_dir(trial, sweep_dir)
    target = source.with_name(f"{source.name}-{CONTINUED}")
    if not prepare_continuation(trial, source, target, study.study_name, parent):
        return None
    cmd = [sys.executable, "-m", "agecls.cli.train", "--config-name", str(cfg.hydra.job.config_name)]
    # trainer.resume takes trainer.max_epochs from the command: the trial's own, to the end of its budget
    epochs = OmegaConf.load(target / "config.yaml").trainer.max_epochs
    cmd += ["trainer.enable_progress_bar=false", f"trainer.resume={target}", f"trainer.max_epochs={epochs}"]
    cmd.append(f"hydra.run.dir={target}")
    return Job(f"{study.study_name}-trial-{trial.number:04d}-{CONTINUED}", cmd, target)


def _promote(study, trial, value: float, results: dict[str, Any]) -> None:
    """Add pruned `trial`'s continuation, which beat the best COMPLETE value, to the study as COMPLETE."""
    import optuna

    attrs = {
        "continued_from": trial.number,
        "mlflow_run_id": results.get("mlflow_run_id"),
        "run_dir": str(results["run_dir"]),
        "checkpoint": results.get("checkpoint"),
        "best_epoch": results.get("best_epoch"),
        "epochs_trained": results.get("epochs_trained"),
        "max_epochs": trial.user_attrs.get("max_epochs"),
        "seed": trial.user_attrs.get("seed"),
    }
    if results.get("objectives") is not None:
        attrs["objectives"] = results["objectives"]
    study.add_trial(
        optuna.trial.create_trial(
            params=trial.params,
            distributions=trial.distributions,
            value=value,
            user_attrs={k: v for k, v in attrs.items() if v is not None},
        )
    )
    log.info("pruned trial %d continued to %.4f: added to the study as a COMPLETE trial", trial.number, value)


# -- re-seeding the top trials -------------------------------------------------------------------------------
def top_trials(study, top: int) -> list[Any]:
    """The `top` COMPLETE trials by value in the study's direction (ties: the lower number)."""
    from optuna.trial import TrialState

    sign = 1.0 if maximizes(study) else -1.0
    complete = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _finite(t.value)
    ]
    return sorted(complete, key=lambda t: (-sign * float(t.value), t.number))[:top]


def reseed_job(trial, seed: int, sweep_dir: Path, study_name: str, parent: str | None) -> Job:
    """The plain run of `trial`'s own config.yaml with `seed`, in `trial-NNNN-seed-S`."""
    own = trial_dir(trial, sweep_dir)
    run_dir = own.with_name(f"{own.name}-seed-{seed}")
    config = OmegaConf.load(own / "config.yaml")
    tags = {"optuna.study": study_name, "optuna.reseed_of": str(trial.number)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    cmd = [sys.executable, "-m", "agecls.cli.train", "--config-path", str(own.resolve())]
    cmd += ["--config-name", "config", "trainer.enable_progress_bar=false"]
    cmd += ["optuna.trial=null", "optuna.parent_run_id=null", "trainer.resume=null", f"seed={seed}"]
    if OmegaConf.select(config, "tracking.enabled"):  # tracking=none has no tags or run name to set
        given = OmegaConf.select(config, "tracking.tags")
        # the user's own tags carry over; the source run's study tags (a promoted trial's
        # optuna.continued_from) describe that run, not this one, and a dict override would merge them in
        kept = {
            k: v
            for k, v in (OmegaConf.to_container(given) if given else {}).items()
            if not str(k).startswith("optuna.") and k != "mlflow.parentRunId"
        }
        cmd += ["~tracking.tags", _tags_override({**kept, **tags}, "+")]
        cmd.append(f"tracking.run_name={_quoted(f'trial {trial.number} seed {seed}')}")
    if OmegaConf.select(config, "bins.search") is not None:
        cmd.append("bins.search=null")  # config.yaml holds the edges the trial drew (bins.ranges)
    cmd.append(f"hydra.run.dir={run_dir}")
    return Job(f"{study_name}-trial-{trial.number:04d}-seed-{seed}", cmd, run_dir)


def reseed(
    study, cfg: DictConfig, executor: Any, slots: list[dict[str, str]], sweep_dir: Path, parent: str | None
) -> list[int]:
    """Re-run the top trials on `optuna.reseed.seeds` and record their seed values, mean and spread (and
    the seeds' ensemble on validation); then the leader those means choose on `optuna.reseed.leader_seeds`,
    recorded again over all its seeds. Returns the re-seeded trials' numbers."""
    top, seeds, _ = followup_settings(cfg)
    more = leader_seeds(cfg)
    picked = top_trials(study, top)
    wanted: dict[int, list[tuple[int, Job]]] = {}
    for trial in list(picked):
        if not (trial_dir(trial, sweep_dir) / "config.yaml").is_file():
            log.warning(
                "trial %d: %s has no config.yaml; not re-seeded", trial.number, trial_dir(trial, sweep_dir)
            )
            picked.remove(trial)
            continue
        wanted[trial.number] = _seed_jobs(trial, seeds, sweep_dir, study.study_name, parent)
    _run_missing(executor, slots, [job for pairs in wanted.values() for _, job in pairs], "re-seed")
    for trial in picked:
        _record_seeds(study, cfg, trial, wanted[trial.number], leader=[])
    if more and picked:
        # the means of the top trials' seeds name the leader (deterministically, so a resumed study picks the
        # same one); its extra seeds then count in the choice like any other
        leader = chosen_trial(fresh(study))
        extra = _seed_jobs(leader, more, sweep_dir, study.study_name, parent)
        _run_missing(executor, slots, [job for _, job in extra], "leader seed")
        _record_seeds(study, cfg, leader, wanted[leader.number] + extra, leader=more)
    return [t.number for t in picked]


def _seed_jobs(trial, seeds: list[int], sweep_dir: Path, study_name: str, parent: str | None):
    """(seed, Job) of `trial` for each of `seeds` but its own."""
    own = trial.user_attrs.get("seed")
    return [(s, reseed_job(trial, s, sweep_dir, study_name, parent)) for s in seeds if s != own]


def _run_missing(executor: Any, slots: list[dict[str, str]], jobs: list[Job], label: str) -> None:
    """Run the jobs without a results.json (those with one finished in an earlier run of the command)."""
    missing = [job for job in jobs if job.results() is None]
    if missing:
        run_jobs(executor, slots, missing, label)


def _record_seeds(study, cfg: DictConfig, trial, pairs: list[tuple[int, Job]], leader: list[int]) -> None:
    """Set `trial`'s user attributes from its own value and its seed runs: reseeds, reseed_runs, seed_mean,
    seed_std, leader_seeds and (a macro-F1 objective) the seeds' ensemble on validation."""
    values, runs = {}, {}
    for seed, job in pairs:
        results = job.results()
        if results is None or not _finite(results.get("objective")):
            log.warning(
                "trial %d seed %d: no result; see %s", trial.number, seed, job.run_dir / "process.log"
            )
            continue
        values[str(seed)] = float(results["objective"])
        runs[str(seed)] = {
            "value": float(results["objective"]),
            "run_dir": str(results["run_dir"]),
            "mlflow_run_id": results.get("mlflow_run_id"),
            "checkpoint": results.get("checkpoint"),
        }
    every = [float(trial.value), *values.values()]
    attrs = {
        "reseeds": values,
        "reseed_runs": runs,
        "seed_mean": float(statistics.fmean(every)),
        "seed_std": float(statistics.stdev(every)) if len(every) > 1 else 0.0,
        "leader_seeds": [s for s in leader if str(s) in values],
    }
    run_dirs = [trial.user_attrs.get("run_dir"), *(r["run_dir"] for r in runs.values())]
    if str(cfg.objective.metric).endswith("macro_f1") and len(run_dirs) > 1 and all(run_dirs):
        try:
            attrs["ensemble_val"] = ensemble_val([Path(str(d)) for d in run_dirs])
        except Exception as exc:  # noqa: BLE001 - a record of the seeds; never stops a study
            log.warning(
                "trial %d: the seeds' ensemble could not be scored on validation: %s", trial.number, exc
            )
    set_finished_attrs(study, trial, attrs)
    log.info(
        "trial %d over seeds %s%s: mean %.4f, std %.4f (values %s)",
        trial.number,
        [trial.user_attrs.get("seed"), *map(int, values)],
        " (the leader's extra seeds included)" if leader else "",
        attrs["seed_mean"],
        attrs["seed_std"],
        ", ".join(f"{v:.4f}" for v in every),
    )


# -- the seeds' ensemble, scored on validation ---------------------------------------------------------------
def ensemble_predictions(run_dirs: list[Path], split: str = "val") -> tuple[pd.DataFrame, list[str], str]:
    """(table, class names, label-column suffix): the equal-weight ensemble of runs of one configuration on
    `split`, from their predictions_<split>.csv (the same faces in the same order): row, label, the mean
    class probabilities p_<class>, and pred decoded as agecls.evaluation.ensemble decodes its members' heads
    (argmax; coral/corn: the cumulative median; regression/label_distribution age heads: the mean predicted
    age, binned). Multitask runs: the objective's attribute, its columns suffixed `_<attribute>`."""
    import pandas as pd
    import torch

    from agecls.data.bins import AgeBins
    from agecls.evaluation.ensemble import decide
    from agecls.tasks.multitask import is_multitask, objective_attribute

    config = OmegaConf.load(run_dirs[0] / "config.yaml")
    results = json.loads((run_dirs[0] / "results.json").read_text())
    multi = is_multitask(config.task)
    attr = objective_attribute(config.task) if multi else None
    names = results["class_names"][attr] if multi else results["class_names"]
    suffix = f"_{attr}" if multi else ""
    frames = [pd.read_csv(d / f"predictions_{split}.csv") for d in run_dirs]
    for d, frame in zip(run_dirs[1:], frames[1:], strict=True):
        if not np.array_equal(frame["row"].to_numpy(), frames[0]["row"].to_numpy()):
            raise ValueError(f"{d / f'predictions_{split}.csv'} lists other faces than {run_dirs[0]}'s")
    columns = [f"p{suffix}_{n}" for n in names]
    proba = np.mean([f[columns].to_numpy(dtype=np.float64) for f in frames], axis=0)
    head = str(OmegaConf.select(config, "task.head") or "classification")
    if (
        (not multi or attr == "age")
        and head in ("regression", "label_distribution")
        and all(f"pred_years{suffix}" in f for f in frames)
    ):
        bins = AgeBins.from_config(config.bins)
        years = np.mean([f[f"pred_years{suffix}"].to_numpy(dtype=np.float64) for f in frames], axis=0)
        low, high = bins.ranges[0][0], bins.ranges[-1][1]
        preds = np.asarray(bins.index(np.clip(np.round(years), low, high)))
    else:
        rule = "ordinal_median" if head in ("coral", "corn") else "argmax"
        preds = decide(rule, torch.as_tensor(proba)).numpy()
    table = pd.DataFrame({"row": frames[0]["row"], f"label{suffix}": frames[0][f"label{suffix}"]})
    table[columns] = proba
    table[f"pred{suffix}"] = preds
    return table, list(names), suffix


def ensemble_val(run_dirs: list[Path]) -> float:
    """Validation macro-F1 of the equal-weight ensemble of one configuration's runs (ensemble_predictions)."""
    import torch

    from agecls.metrics import stage_report

    table, names, suffix = ensemble_predictions(run_dirs, "val")
    labels = torch.tensor(table[f"label{suffix}"].to_numpy())
    preds = torch.tensor(table[f"pred{suffix}"].to_numpy())
    known = labels >= 0
    return float(stage_report(preds[known], labels[known], names).metrics["macro_f1"])


# -- the whole follow-up -------------------------------------------------------------------------------------
def run_followups(
    study, cfg: DictConfig, executor: Any, slots: list[dict[str, str]], sweep_dir: Path, parent: str | None
) -> dict[str, Any]:
    """After the study's n_trials: continue pruned trials (`optuna.check_pruned`), then re-seed the top
    trials (`optuna.reseed`); write selection.csv and followup.json in the sweep folder. Returns the summary
    ({"study/pruned_checked", "study/pruned_would_win", "chosen_trial", ...}); {} when both are off."""
    top, _, k = followup_settings(cfg)
    if not top and not k:
        return {}
    summary: dict[str, Any] = {}
    if k:
        summary.update(check_pruned(study, cfg, executor, slots, sweep_dir, parent))
    if top:
        summary["reseeded"] = reseed(study, cfg, executor, slots, sweep_dir, parent)
    study = fresh(study)
    try:
        chosen = chosen_trial(study)
    except ValueError:
        log.warning("no trial of study %r completed: nothing to choose", study.study_name)
        return summary
    seed, run_id, run_dir, value = best_seed_run(study, chosen)
    kind, members, why = served(study, chosen)
    summary.update(
        chosen_trial=chosen.number,
        seed_mean=chosen.user_attrs.get("seed_mean"),
        seed_std=chosen.user_attrs.get("seed_std"),
        best_seed={"seed": seed, "mlflow_run_id": run_id, "run_dir": run_dir, "value": value},
        ensemble_val=chosen.user_attrs.get("ensemble_val"),
        serve={"kind": kind, "members": members, "why": why},
    )
    table = selection_table(study)
    table.to_csv(sweep_dir / "selection.csv", index=False)
    (sweep_dir / "followup.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    spread = (
        ""
        if summary["seed_mean"] is None
        else f", seed mean {summary['seed_mean']:.4f} ± {summary['seed_std']:.4f}"
    )
    log.info(
        "chosen trial %d (value %.4f%s); its best seed %s: %.4f (%s); @best serves the %s: %s",
        chosen.number,
        float(chosen.value),
        spread,
        seed,
        value,
        run_dir,
        "seeds' ensemble" if kind == "ensemble" else "best seed",
        why,
    )
    return summary
