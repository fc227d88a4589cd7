"""Search vs hand recipe at the same budget: does agecls's automated study beat the recipe found by hand?

For each task and bench seed, three sides spend the same total epochs (`--budget-epochs`) on real UTKFace
(the persisted split, `--size` px), every run `--run-epochs` long:

  dissertation: its final settings (experiment=agecnn / gendercnn / ethnicitycnn), the budget spent on seeds:
                runs of `--run-epochs` epochs with seeds 1000*s, 1000*s+1, ..., the best on validation chosen;
  recipe:       agecls's hand recipe (the README's overrides on the same settings), the same way;
  study:        an Optuna study over `sweep=optuna_recipe` (no hand-picked levers) with warm starts (the
                dissertation's settings and the recipe's levers enqueued first), its multi-fidelity pruner,
                and the top `--reseed-top` trials re-run on `--reseed-seeds` more seeds, chosen by their
                mean validation value. Trials are added while a full-length trial still fits the budget
                left after the re-seeds: the epochs really spent (trials, minus what pruning saved, plus
                re-seeds and continued pruned trials) are counted from the study and shown beside the budget.

A side launches a run only while a whole run still fits in its budget, so each side ends at most one run's
epochs under it (early stopping and pruning can leave it further under; the table says how far). Selection
is on validation only; each chosen model's test predictions are read once at the end, and each side is paired
with the recipe's chosen model over the same test faces (`agecls-compare`'s paired bootstrap).

    .venv/bin/python bench/search.py --write BENCHMARKS.md       # hours on CPU: make bench-search
    .venv/bin/python bench/search.py --tasks age --seeds 1 --fraction 0.05 --budget-epochs 4 --run-epochs 2
    .venv/bin/python bench/search.py --tasks gender --out outputs/bench/search/X --write BENCHMARKS.md
    .venv/bin/python bench/search.py --quick                     # smoke: generated faces, 16 px

With `--out` naming an earlier run's folder, finished cells (a task and seed with its three sides) and
finished seed runs are read back rather than run again, and the section shows every cell of that folder: a
benchmark too long for one sitting runs task by task (or after a crash) into the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quality import (
    DEFAULT_ROOT,
    EXPERIMENTS,
    REPO,
    run_logged,
    strided_manifest,
    thread_env,
)  # bench/ is on sys.path
from sections import (
    args_record,
    current_keys,
    machine_text,
    provenance,
    read_notes,
    render_saved,
    save_report,
)

SECTION = "search"  # the default section; --section names another (a second protocol beside this one)


def markers(section: str = SECTION) -> tuple[str, str]:
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"


RESULTS = Path(__file__).parent / "results"  # the committed record of the section (tests point it elsewhere)
SIDES = ("dissertation", "recipe", "study")
# The README's recipe on top of the dissertation's settings: EMA and flip TTA for every task, OneCycle to 1e-3
# for age and gender (it lost on validation for ethnicity).
SHARED = ["callbacks.ema.enabled=true", "callbacks.ema.decay=0.995", "augment.tta=auto"]
ONECYCLE = ["scheduler=onecycle", "optimizer.lr=1e-3"]
RECIPE = {"age": [*SHARED, *ONECYCLE], "gender": [*SHARED, *ONECYCLE], "ethnicity": SHARED}
# The warm starts, in the search space's keys: the dissertation's final settings, and the recipe's levers on
# them (flip for `augment.tta=auto`, which the space searches as none | flip).
DISSERTATION_START = {
    "callbacks.ema.enabled": False,
    "callbacks.ema.decay": 0.99,
    "augment.tta": "none",
    "scheduler": "none",
    "optimizer.lr": 1e-4,
    "optimizer.weight_decay": 0.1,
    "model.dropout": 0.6,
    "task.label_smoothing": 0.001,
    "augment.mix.mixup_alpha": 0.0,
    "augment.mix.cutmix_alpha": 0.0,
    "sampler": "weighted",
    "task.head": "classification",
}
RECIPE_START = {"callbacks.ema.enabled": True, "callbacks.ema.decay": 0.995, "augment.tta": "flip"}
ONECYCLE_START = {"scheduler": "onecycle", "optimizer.lr": 1e-3}
# optuna_recipe's weight decays stop at 1e-2; the dissertation's 0.1 joins them so its warm start is its own
# setting rather than a neighbour drawn by the sampler.
WEIGHT_DECAYS = "optimizer.weight_decay=choice(0.0,1e-4,1e-3,1e-2,0.1)"
# Warm-start keys that exist only in the age task's config (task=gender|ethnicity has no head to choose).
AGE_ONLY = ("task.head",)
QUICK_DATA = [
    "data=synthetic",
    "data.synthetic.n=200",
    "model.blocks=2",
    "model.base_channels=8",
    "model.hidden=16",
    "data.batch_size=32",
]
# Quick mode: sweep=optuna_recipe's successive halving with its first rung at epoch 1 of a 2-epoch run.
QUICK_PRUNER = ["optuna.pruner.min_resource=1"]


def warm_starts(task: str) -> list[dict]:
    """The study's enqueued configurations for `task`: the dissertation's settings, then the recipe's."""
    diss = {k: v for k, v in DISSERTATION_START.items() if task == "age" or k not in AGE_ONLY}
    recipe = {**diss, **RECIPE_START, **(ONECYCLE_START if task != "ethnicity" else {})}
    return [diss, recipe]


def hydra_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def enqueue_override(starts: list[dict]) -> str:
    """`optuna.enqueue=[{k: v, ...}, ...]` in Hydra's override syntax."""
    entries = ", ".join("{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in s.items()) + "}" for s in starts)
    return f"optuna.enqueue=[{entries}]"


def recipe_sweep(task: str) -> list[str]:
    """Overrides selecting the study's search space: `sweep=optuna_recipe` for every task (its task.head is an
    optional key, searched for age only)."""
    return ["sweep=optuna_recipe"]


def train_subset(args, out: Path) -> tuple[Path, str]:
    """(CSV, source): UTKFace's persisted split with `--fraction` of its train rows (a fixed random draw, seed
    0), validation and test whole, for `data=manifest`."""
    from hydra import compose, initialize_config_dir

    from agecls.config import CONFIG_DIR, register_resolvers
    from agecls.data.prepare import data_lock, resolve_manifest

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=utkface", f"data.root={args.root}"])
    with data_lock(cfg.paths.data_dir):
        manifest = resolve_manifest(cfg.data, cfg.paths)
    df = manifest.df
    train = df[df["split"] == "train"]
    keep = train.sample(frac=args.fraction, random_state=0).sort_index()
    cols = [c for c in ("path", "age", "gender", "ethnicity", "sha1", "split") if c in df.columns]
    path = out / f"utkface-train{args.fraction:g}.csv"
    __import__("pandas").concat([keep, df[df["split"] != "train"]])[cols].to_csv(path, index=False)
    return path, str(manifest.path)


def common(args, task: str, tracked: bool = False) -> list[str]:
    """Overrides of every run and trial of `task`: its dissertation experiment, the data, the device; MLflow
    tracking when `tracked` (the study: its parent run, and the re-seeded runs it records there)."""
    if args.quick:
        data = QUICK_DATA
    elif args.manifest:
        data = ["data=manifest", f"data.path={args.manifest}", f"data.root={args.root}"]
    else:
        data = ["data=utkface", f"data.root={args.root}"]
    device = [] if args.device == "auto" else [f"trainer.accelerator={args.device}"]
    # one MLflow experiment per data (agecls keeps one split per experiment)
    experiment = f"search-{task}-" + (
        "quick" if args.quick else f"stride{args.stride}-train{args.fraction:g}"
    )
    return [
        f"experiment={EXPERIMENTS[task]}",
        *(
            ["tracking=mlflow", f"tracking.experiment={experiment}", "tracking.log_checkpoint=false"]
            if tracked
            else ["tracking=none"]
        ),
        *data,
        f"data.image_size={args.size}",
        f"trainer.max_epochs={args.run_epochs}",
        "trainer.enable_progress_bar=false",
        *device,
        *args.set,
    ]


def read_run(run_dir: Path) -> dict:
    """One finished run: validation objective (flip TTA included when chosen), epochs, fit time."""
    res = json.loads((run_dir / "results.json").read_text())
    return {
        "run_dir": str(run_dir),
        "val": float(res["objective"]),
        "epochs": int(res["epochs_trained"]),
        "fit_s": float(res["fit_seconds"]),
    }


def seeded_side(args, task: str, seed: int, side: str, out: Path) -> dict:
    """The dissertation's or the recipe's settings trained on seeds 1000*seed + i while a whole run still
    fits in the budget (`--parallel` at a time); the best on validation is the side's model."""
    side_dir = out / task / f"seed-{seed}" / side
    side_dir.mkdir(parents=True, exist_ok=True)
    extra = RECIPE[task] if side == "recipe" else []
    runs: list[dict] = []
    began = time.perf_counter()

    def one(i: int) -> dict:
        run_dir = side_dir / f"run-{i}"
        if (run_dir / "results.json").is_file():  # finished in an earlier sitting: its wall is not known here
            return {**read_run(run_dir), "earlier": True}
        cmd = [sys.executable, "-m", "agecls.cli.train", *common(args, task), *extra]
        cmd += [f"seed={1000 * seed + i}", f"hydra.run.dir={run_dir}"]
        run_logged(cmd, side_dir / f"run-{i}.log", thread_env(args.threads))
        return read_run(run_dir)

    spent = 0
    while (room := (args.budget_epochs - spent) // args.run_epochs) > 0:
        batch = range(len(runs), len(runs) + min(room, args.parallel))
        with ThreadPoolExecutor(len(batch)) as pool:
            runs += list(pool.map(one, batch))
        spent = sum(r["epochs"] for r in runs)
    chosen = max(runs, key=lambda r: r["val"])
    return {
        "side": side,
        "epochs": spent,
        "wall_s": float("nan") if any(r.get("earlier") for r in runs) else time.perf_counter() - began,
        "runs": runs,
        "chosen": chosen,
        "detail": f"{len(runs)} seeds, val " + " ".join(f"{r['val']:.4f}" for r in runs),
    }


# What must match for a cell of an earlier sitting to join this one's table (not how many runs at a time).
CELL_KEYS = (
    "size",
    "budget_epochs",
    "run_epochs",
    "fraction",
    "stride",
    "reseed_top",
    "reseed_seeds",
    "leader_seeds",
    "check_pruned",
    "set",
    "study_set",
)
# Keys added to CELL_KEYS after cells were recorded: a record without one ran with this value.
LATER_KEYS = {"leader_seeds": 0}


def save_cell(out: Path, task: str, seed: int, args, sides: dict) -> None:
    """One finished cell (a task and bench seed, its three sides scored on test), for a later sitting."""
    record = {"settings": {k: getattr(args, k) for k in CELL_KEYS}, "sides": sides}
    path = out / task / f"seed-{seed}" / "cell.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def earlier_cells(out: Path, args) -> dict[str, dict[str, dict]]:
    """The cells finished in `out` by earlier sittings: {task: {seed: sides}}; SystemExit when one was run
    with other settings (its numbers would not belong in the same table)."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(out.glob("*/seed-*/cell.json")):
        record = json.loads(path.read_text())
        # a key the record lacks was not recorded then (kept with the settings it had)
        mine = {k: getattr(args, k) for k in CELL_KEYS}
        theirs = {k: record["settings"].get(k, LATER_KEYS.get(k, v)) for k, v in mine.items()}
        diff = {k: (theirs[k], v) for k, v in mine.items() if theirs[k] != v}
        if diff:
            raise SystemExit(f"{path}: run with other settings (earlier, now): {diff}; use another --out")
        found.setdefault(path.parent.parent.name, {})[path.parent.name.removeprefix("seed-")] = record[
            "sides"
        ]
    return {t: found[t] for t in EXPERIMENTS if t in found}


def study_devices(args) -> str:
    """optuna.devices: CPU only for --device cpu; with --device gpu and --jobs J > 1, J trials share GPU 0
    (as J seed runs do with --parallel J); else one trial per visible GPU."""
    if args.device == "cpu":
        return "null"
    if args.device == "gpu" and args.jobs > 1:
        return "[" + ",".join(["0"] * args.jobs) + "]"
    return "auto"


def study_name(task: str, seed: int) -> str:
    return f"search-{task}-s{seed}"


def load(args, task: str, seed: int, out: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{out / task / f'seed-{seed}' / 'optuna.db'}"
    return optuna.load_study(study_name=study_name(task, seed), storage=storage)


def run_epochs(run: dict) -> int:
    """Epochs of one re-seeded or continued run: as recorded, else from its results.json (0 when neither)."""
    if run.get("epochs") is not None:
        return int(run["epochs"])
    results = Path(str(run.get("run_dir") or "")) / "results.json"
    return int(json.loads(results.read_text())["epochs_trained"]) if results.is_file() else 0


def study_epochs(study) -> dict:
    """Epochs the study really spent: each trial's reported epochs (a pruned trial's stop where it was cut),
    plus its re-seeded runs and a continued pruned trial's extra epochs, as the sweeper recorded them."""
    from optuna.trial import TrialState

    trials = reseeds = continued = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        attrs = t.user_attrs
        reseeds += sum(run_epochs(r) for r in (attrs.get("reseed_runs") or {}).values())
        if attrs.get("continued_from") is not None:
            continue  # a continued pruned trial that joined the study: its epochs are its source's continued
        done = len(t.intermediate_values) or int(attrs.get("epochs_trained", 0))
        trials += done
        if attrs.get("continued"):  # resumed from the pruned trial's last.ckpt: only the epochs after it
            continued += max(0, run_epochs(attrs["continued"]) - done)
    return {
        "trials": trials,
        "reseeds": reseeds,
        "continued": continued,
        "total": trials + reseeds + continued,
    }


def chosen(study):
    """The trial the study names as best (by seed mean when re-seeded: agecls.sweep.selection)."""
    try:
        from agecls.sweep.selection import chosen_trial
    except ImportError:  # before noise-aware selection: the plain best trial
        return study.best_trial
    return chosen_trial(study)


def study_side(args, task: str, seed: int, out: Path) -> dict:
    """The automated study, grown trial batch by trial batch while a full-length trial fits the budget left
    after the re-seeds and continued pruned trials it reserves; then those follow-ups once."""
    seed_dir = out / task / f"seed-{seed}"
    sweep_dir = seed_dir / "study"
    seed_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "agecls.cli.train",
        "-m",
        *common(args, task, tracked=True),
        *recipe_sweep(task),
    ]
    cmd += [
        f"seed={1000 * seed}",
        f"optuna.study_name={study_name(task, seed)}",
        f"optuna.storage=sqlite:///{seed_dir / 'optuna.db'}",
        f"optuna.n_jobs={args.jobs}",
        "optuna.register_best=false",
        f"optuna.devices={study_devices(args)}",
        enqueue_override(warm_starts(task)),
        WEIGHT_DECAYS,
        f"hydra.sweep.dir={sweep_dir}",
        *args.study_set,
    ]
    # the seeds of the seeded sides' second, third, ... runs: each re-seed has a same-seed run on both sides
    reseed_seeds = [1000 * seed + 1 + i for i in range(args.reseed_seeds)]
    leader_seeds = [1000 * seed + 1 + args.reseed_seeds + i for i in range(args.leader_seeds)]
    reserve = args.run_epochs * (args.reseed_top * len(reseed_seeds) + len(leader_seeds) + args.check_pruned)
    began, rounds, n_trials, spent = time.perf_counter(), 0, 0, {"trials": 0}
    while (room := (args.budget_epochs - reserve - spent["trials"]) // args.run_epochs) > 0:
        n_trials += room  # each at most a whole run: the round cannot overrun the budget
        rounds += 1
        follow = ["optuna.reseed.top=0", "optuna.check_pruned=0"]
        run_logged(
            [*cmd, f"optuna.n_trials={n_trials}", *follow], seed_dir / f"study-{rounds}.log", thread_env(1)
        )
        spent = study_epochs(load(args, task, seed, out))
    if args.reseed_top or args.check_pruned:
        seeds = "[" + ",".join(map(str, reseed_seeds)) + "]"
        follow = [f"optuna.reseed.top={args.reseed_top}", f"optuna.reseed.seeds={seeds}"]
        follow.append("optuna.reseed.leader_seeds=[" + ",".join(map(str, leader_seeds)) + "]")
        follow.append(f"optuna.check_pruned={args.check_pruned}")
        run_logged(
            [*cmd, f"optuna.n_trials={n_trials}", *follow], seed_dir / "study-followup.log", thread_env(1)
        )
    return read_study(args, task, seed, out, time.perf_counter() - began)


def read_study(args, task: str, seed: int, out: Path, wall: float = float("nan")) -> dict:
    """The study side: what its `@best` serves of the chosen configuration (its best run on validation,
    the trial or a re-seed, or the seeds' ensemble where validation prefers it), the epochs spent, and what
    the trials show (counts, pruned, values)."""
    from optuna.trial import TrialState

    study = load(args, task, seed, out)
    best = chosen(study)
    attrs = best.user_attrs
    runs = [read_run(Path(attrs["run_dir"]))]
    runs += [
        read_run(Path(r["run_dir"])) for r in (attrs.get("reseed_runs") or {}).values() if r.get("run_dir")
    ]
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    pruned = sum(t.state == TrialState.PRUNED for t in finished)
    values = [round(float(t.value), 4) for t in finished if t.value is not None]
    spent = study_epochs(study)
    mean = attrs.get("seed_mean")
    detail = (
        f"{len(finished)} trials ({pruned} pruned; {spent['trials']} epochs), re-seeds {spent['reseeds']} "
        f"epochs, continued {spent['continued']}; chose trial {best.number}"
        + (f" ({attrs['warm_start']})" if attrs.get("warm_start") else "")
        + (f", seed mean {mean:.4f} ± {attrs.get('seed_std', 0.0):.4f}" if mean is not None else "")
    )
    pick = max(runs, key=lambda r: r["val"])
    kind, why = serves(study, best)
    if kind == "ensemble":
        pick = served_ensemble(best, seed_dir=out / task / f"seed-{seed}")
        detail += f"; serves its seeds' ensemble ({why})"
    return {
        "side": "study",
        "epochs": spent["total"],
        "epochs_split": spent,
        "wall_s": wall,
        "runs": runs,
        "chosen": pick,
        "served": kind,
        "served_why": why,
        "trial": best.number,
        "params": best.params,
        "warm_start": attrs.get("warm_start"),
        "seed_mean": mean,
        "seed_std": attrs.get("seed_std"),
        "trials": len(finished),
        "pruned": pruned,
        "trial_values": values,
        "detail": detail,
    }


def serves(study, trial) -> tuple[str, str]:
    """(kind, why): what the study's `@best` would serve of the chosen configuration (its best seed, or its
    seeds' ensemble when validation prefers it: agecls.sweep.selection.served)."""
    try:
        from agecls.sweep.selection import served
    except ImportError:  # before the ensemble could be served
        return "seed", "the best seed"
    kind, _, why = served(study, trial)
    return kind, why


def served_ensemble(trial, seed_dir: Path) -> dict:
    """The chosen configuration's seeds' ensemble as the study's model: its validation and test predictions
    (mean class probabilities, argmax: agecls.sweep.followup.ensemble_predictions) written to
    `<seed_dir>/study-served`, with the first member's config and results, for the test read-out."""
    import shutil

    from agecls.sweep.followup import ensemble_predictions
    from agecls.sweep.selection import seed_runs

    members = [Path(str(r["run_dir"])) for _, r in sorted(seed_runs(trial).items())]
    folder = seed_dir / "study-served"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "results.json"):
        shutil.copyfile(members[0] / name, folder / name)
    for split in ("val", "test"):
        table, _, _ = ensemble_predictions(members, split)
        table.to_csv(folder / f"predictions_{split}.csv", index=False)
    return {
        "run_dir": str(folder),
        "val": float(trial.user_attrs["ensemble_val"]),
        "epochs": sum(read_run(m)["epochs"] for m in members),
        "members": [str(m) for m in members],
    }


def score_test(sides: dict[str, dict], n_boot: int) -> None:
    """Test macro-F1 of each side's chosen model (read here, once) and each side minus the recipe with the
    paired bootstrap interval over the same test faces (`agecls-compare --split test`)."""
    from agecls.evaluation.compare import CompareError, compare_runs

    recipe = Path(sides["recipe"]["chosen"]["run_dir"]) / "predictions_test.csv"
    for name, side in sides.items():
        preds = Path(side["chosen"]["run_dir"]) / "predictions_test.csv"
        try:
            report = compare_runs(preds, recipe, split="test", n=n_boot, seed=0)
        except CompareError as exc:
            raise SystemExit(f"cannot pair {name}'s test predictions with the recipe's: {exc}") from exc
        side["test"] = report["macro_f1"]["A"][0]
        side["test_faces"] = report["faces"]
        if name != "recipe":
            diff = report["macro_f1"]["A-B"]
            side["vs_recipe"] = {k: diff[k] for k in ("diff", "lo", "hi", "p_a_not_better")}


def seed_tests(sides: dict[str, dict]) -> None:
    """Each seeded side's runs scored on test (`runs_test`), read after every side has chosen its model and
    never used to choose: how far one configuration's seeds alone move test macro-F1, beside the gaps
    between the sides' chosen models (whose paired intervals cover the test faces, not the seeds)."""
    from agecls.evaluation.compare import CompareError, compare_runs

    for name in ("dissertation", "recipe"):
        side = sides[name]
        if "runs_test" in side:
            continue
        try:
            side["runs_test"] = [
                compare_runs(r["run_dir"], r["run_dir"], split="test", n=1, seed=0)["macro_f1"]["A"][0]
                for r in side["runs"]
            ]
        except CompareError as exc:  # a run folder of an earlier sitting is gone: its spread is not shown
            print(f"{name}: seed runs not scored on test ({exc})", flush=True)


def reading(rep: dict) -> list[str]:
    """One line from the numbers, per task over its bench seeds: in how many the study is at least level with
    the recipe on validation / on test, significantly ahead / behind it on test, at least level by the
    configurations' seed means on validation, and at least level with the dissertation's settings on test."""
    per: dict[str, list[str]] = {"val / test": [], "ahead / behind": [], "means": [], "dissertation": []}
    for task, seeds in rep["tasks"].items():
        cells = list(seeds.values())
        study, recipe = [c["study"] for c in cells], [c["recipe"] for c in cells]
        val = sum(s["chosen"]["val"] >= r["chosen"]["val"] for s, r in zip(study, recipe, strict=True))
        test = sum(s["test"] >= r["test"] for s, r in zip(study, recipe, strict=True))
        per["val / test"].append(f"{task} {val} / {test}")
        ahead = sum(s["vs_recipe"]["lo"] > 0 for s in study)
        per["ahead / behind"].append(f"{task} {ahead} / {sum(s['vs_recipe']['hi'] < 0 for s in study)}")
        means = [m for m in map(seed_means, cells) if m]
        per["means"].append(f"{task} {sum(mine >= theirs for theirs, mine in means)} of {len(means)}")
        level = sum(s["test"] >= c["dissertation"]["test"] for s, c in zip(study, cells, strict=True))
        per["dissertation"].append(f"{task} {level} of {len(cells)}")
    return [
        "- Study vs recipe, by task: at least level on val / test "
        + ", ".join(per["val / test"])
        + "; significantly ahead / behind on test "
        + ", ".join(per["ahead / behind"])
        + "; at least level by the seeds' means on val "
        + ", ".join(per["means"])
        + ". Study at least level with the dissertation's settings on test: "
        + ", ".join(per["dissertation"])
        + "."
    ]


def seed_means(cell: dict[str, dict]) -> tuple[float, float] | None:
    """The configurations rather than the picks on validation: the recipe side's mean over its seed runs and
    the mean over the seeds of the configuration the study chose (None where either has no seeds' mean). A
    side's best of 8 runs sits above its configuration's mean by the luck of the draw, the study's best of 3
    less so."""
    import statistics

    runs, mean = cell["recipe"]["runs"], cell["study"].get("seed_mean")
    if len(runs) < 2 or mean is None:
        return None
    return statistics.mean(r["val"] for r in runs), mean


def _ci(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def _study_cell(s: dict) -> str:
    """The study side in values: trials (pruned); the configuration chosen; `ensemble` when it serves the
    seeds' ensemble (the per-trial narrative stays in the record's `detail`)."""
    picked = s.get("warm_start") or f"trial {s['trial']}"
    return f"{s['trials']} ({s['pruned']}); {picked}" + (
        "; ensemble" if s.get("served") == "ensemble" else ""
    )


def render(rep: dict) -> str:
    a, m = rep["args"], rep["machine"]
    name = rep.get("section", SECTION)  # reports saved before --section existed are the default one
    begin, end = markers(name)
    title = "## Search vs hand recipe at the same budget"
    if name != SECTION:
        title += f": runs of {a['run_epochs']} epochs, {a['budget_epochs']} per side"
    follow = f"top {a['reseed_top']} re-run on {a['reseed_seeds']} more seed(s), chosen by seed mean"
    if a.get("leader_seeds"):
        follow += f", the leader on {a['leader_seeds']} more"
    if a.get("check_pruned"):
        follow += f", {a['check_pruned']} pruned trial(s) continued"
    lines = [
        begin,
        title,
        "",
        *provenance(
            rep["command"],
            machine_text(m) + f"; 1-min load {rep['load_start']} at the start",
            f"{rep['date']} ({rep['seconds'] / 60:.0f} min in all)",
        ),
        f"- Setup: {rep['data']} (train/val/test rows {rep['sizes']['train']}/{rep['sizes']['val']}/"
        f"{rep['sizes']['test']}), {a['size']} px greyscale; {a['budget_epochs']} epochs per task, bench "
        f"seed and side in runs of {a['run_epochs']}. Dissertation: "
        "`experiment=agecnn|gendercnn|ethnicitycnn` on seeds 1000·s+i, best on validation; recipe: the same "
        "plus "
        + ", ".join(f"`{current_keys(o)}`" for o in SHARED)
        + " (age, gender: also "
        + ", ".join(f"`{o}`" for o in ONECYCLE)
        + f"); study: `sweep=optuna_recipe` with `{WEIGHT_DECAYS}`, both warm-started, trial seed 1000·s, "
        f"{follow}; `@best` serves the best seed or the seeds' ensemble. Test read once; intervals paired "
        f"over the test faces ({rep['n_boot']} resamples).",
        "",
        "| task | seed | val macro-F1: dissertation / recipe / study | test macro-F1: dissertation / recipe "
        "/ study | study − recipe, test [95% CI] | dissertation − recipe, test [95% CI] "
        "| study: trials (pruned); chosen | seeds' mean, val: recipe / study | epochs: dissertation / recipe "
        "/ study (budget) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, seeds in rep["tasks"].items():
        for seed, sides in seeds.items():
            d, r, s = (sides[n] for n in SIDES)
            means = seed_means(sides)
            lines.append(
                f"| {task} | {seed} | {d['chosen']['val']:.4f} / {r['chosen']['val']:.4f} / "
                f"{s['chosen']['val']:.4f} | {d['test']:.4f} / {r['test']:.4f} / {s['test']:.4f} "
                f"| {_ci(s.get('vs_recipe'))} | {_ci(d.get('vs_recipe'))} | {_study_cell(s)} "
                f"| {'-' if not means else f'{means[0]:.4f} / {means[1]:.4f}'} "
                f"| {d['epochs']} / {r['epochs']} / {s['epochs']} ({a['budget_epochs']}) |"
            )
    lines += ["", *rep["reading"], *rep.get("notes", []), end]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("AGECLS_UTKFACE", DEFAULT_ROOT)))
    parser.add_argument("--size", type=int, default=32, help="image side in px")
    parser.add_argument(
        "--tasks", default="age,gender,ethnicity", help="comma-separated: age,gender,ethnicity"
    )
    parser.add_argument("--seeds", type=int, default=3, help="bench seeds: each side runs once per seed")
    parser.add_argument("--budget-epochs", type=int, default=64, help="epochs per task, seed and side")
    parser.add_argument("--run-epochs", type=int, default=8, help="epochs of one run (a full-length trial)")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the train split kept (fixed)")
    parser.add_argument(
        "--stride", type=int, default=1, help="keep 1 row in n of each split (train, val and test alike)"
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "gpu"], help="trainer.accelerator"
    )
    parser.add_argument(
        "--reseed-top", type=int, default=2, help="the study's top trials re-run on more seeds"
    )
    parser.add_argument("--reseed-seeds", type=int, default=1, help="extra seeds per re-run trial")
    parser.add_argument(
        "--leader-seeds",
        type=int,
        default=0,
        help="extra seeds of the trial the re-seeds choose (optuna.reseed.leader_seeds), inside the budget",
    )
    parser.add_argument("--check-pruned", type=int, default=0, help="pruned trials continued to the end")
    parser.add_argument("--parallel", type=int, default=1, help="seed runs of a side at a time")
    parser.add_argument(
        "--jobs", type=int, help="study trials at a time (optuna.n_jobs; default: --parallel)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per seed run (default: CPUs / --parallel, as the sweeper gives each trial)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every side")
    parser.add_argument("--study-set", nargs="*", default=[], help="overrides for the study only")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="CI smoke: generated faces, 16 px, tiny budget")
    parser.add_argument("--out", type=Path, help="folder for the runs (default outputs/bench/search/<stamp>)")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of a markdown file")
    parser.add_argument("--notes", type=Path, help="Markdown lines to append to the section")
    parser.add_argument("--from-json", type=Path, help="render a saved bench/results/search.json instead")
    parser.add_argument(
        "--section",
        default=SECTION,
        help="the section of --write (and bench/results/<section>.json) this run rewrites: another name "
        "keeps a second protocol beside the default one",
    )
    args = parser.parse_args(argv)
    if not args.section.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--section {args.section!r}: letters, digits, '-' and '_' only")
    if args.from_json:
        return render_saved(
            args.from_json,
            lambda rep: render({**rep, "reading": reading(rep)}),  # the reading as today's code words it
            args.write,
            lambda rep: markers(rep.get("section", SECTION)),
            args.notes,
        )
    given = argv if argv is not None else sys.argv
    if args.quick and "--tasks" not in given:
        args.tasks = "age"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in EXPERIMENTS]
    if unknown or not tasks:
        raise SystemExit(
            f"--tasks {args.tasks}: {unknown[0] if unknown else 'none'} is not a task; "
            "valid: age, gender, ethnicity"
        )
    if args.quick:  # 1 seed, 2-epoch runs, 4 epochs per side: 2 seed runs; the study: 2 trials, 1 re-seed
        args.size, args.run_epochs, args.budget_epochs = 16, 2, 4
        args.reseed_top, args.reseed_seeds, args.check_pruned = 1, 1, 0
        args.seeds = args.seeds if "--seeds" in given else 1
        args.study_set = [*QUICK_PRUNER, *args.study_set]
        args.device, args.parallel, args.jobs = "cpu", 2, 1
    elif not args.root.is_dir():
        raise SystemExit(f"UTKFace folder not found: {args.root} (--root or AGECLS_UTKFACE)")
    if args.run_epochs < 1 or args.budget_epochs < args.run_epochs:
        raise SystemExit(
            f"--budget-epochs {args.budget_epochs} --run-epochs {args.run_epochs}: the budget must hold at "
            "least one run"
        )
    if args.leader_seeds and not (args.reseed_top and args.reseed_seeds):
        raise SystemExit(
            f"--leader-seeds {args.leader_seeds}: the leader is chosen among re-seeded trials; "
            "valid with --reseed-top >= 1 and --reseed-seeds >= 1"
        )
    # A study trial gets CPUs / optuna.n_jobs threads from the sweeper: the seed runs get as many
    args.jobs = args.jobs or args.parallel
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    from data_pipeline import machine

    began, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    base = Path(os.environ.get("AGECLS_OUTPUT_DIR", REPO / "outputs"))
    out = args.out or base / "bench" / "search" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    args.manifest, source = None, None
    if not args.quick and (args.fraction < 1 or args.stride > 1):
        if args.fraction < 1 and args.stride > 1:
            raise SystemExit(
                "--fraction and --stride: choose one (a share of train, or 1 in n of every split)"
            )
        args.manifest, source = (strided_manifest if args.stride > 1 else train_subset)(args, out)
        print(f"data: {args.manifest} (from {source})", flush=True)
    results = earlier_cells(out, args)
    resumed = sum(len(seeds) for seeds in results.values())
    for task in tasks:
        for seed in range(1, args.seeds + 1):
            if str(seed) in results.get(task, {}):
                continue
            sides = {
                "dissertation": seeded_side(args, task, seed, "dissertation", out),
                "recipe": seeded_side(args, task, seed, "recipe", out),
                "study": study_side(args, task, seed, out),
            }
            score_test(sides, args.n_boot)  # each side has chosen its model: test is read once, here
            results.setdefault(task, {})[str(seed)] = sides
            save_cell(out, task, seed, args, sides)
            for name, s in sides.items():
                print(
                    f"{task:10s} seed {seed} {name:12s} val {s['chosen']['val']:.4f}  epochs {s['epochs']}/"
                    f"{args.budget_epochs}  {s['wall_s'] / 60:.1f} min  {s['detail']}",
                    flush=True,
                )
    for seeds in results.values():
        for sides in seeds.values():
            seed_tests(sides)
    task0 = next(iter(results))
    first = json.loads(
        (
            Path(next(iter(results[task0].values()))["recipe"]["chosen"]["run_dir"]) / "results.json"
        ).read_text()
    )
    rep = {
        "command": "python bench/search.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + (f"  (cells of earlier sittings in {out} read back)" if resumed else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "args": args_record(args),
        "data": "generated synthetic faces (quick mode)"
        if args.quick
        else f"real UTKFace at {args.root}, the persisted split"
        + (
            f" with 1 row in {args.stride} of each split (sorted by file name)"
            if args.stride > 1
            else f" with {args.fraction:g} of its train rows (a fixed draw; val and test whole)"
            if source
            else ""
        ),
        "sizes": first["data_sizes"],
        "load_start": load_start,
        "n_boot": args.n_boot,
        "tasks": results,
        "out": str(out),
        "seconds": time.perf_counter() - began,
        "section": args.section,
    }
    rep["reading"] = reading(rep)
    if args.notes:
        rep["notes"] = read_notes(args.notes, args.write)
    section = render(rep)
    print(section)
    save_report(rep, args.section, out, RESULTS, section, args.write, markers(args.section), args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
