"""Every group swap on top of every experiment composes and validates: `agecls-train experiment=E group=O` for
each experiment E and each option O of the swappable groups, as a user or a study would draw it (no
training). A swap refused is refused for a reason listed in docs/CONFIG.md ("Swaps that are refused"), and
each listed reason refuses exactly the swaps it names."""

from __future__ import annotations

import functools
import importlib.util
import operator
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
from omegaconf import OmegaConf

from agecls.config import CONFIG_DIR, project_root

GROUPS = ["optimizer", "scheduler", "model", "sampler", "augment", "bins", "task"]
OPTIONS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in GROUPS}
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# The default suite composes the named experiments; the dissertation's variants v01-v20 (the same groups,
# other options) are `heavy` (make test-heavy): the whole matrix is about 90 s of both cores.
NAMED = [e for e in EXPERIMENTS if not (e[0] == "v" and e[1:].isdigit())]
REQUIRED = {"utkface": ["data.root=/data/UTKFace"]}  # a value the user gives; the folder is not read here
COMPARE = {"<": operator.lt, "==": operator.eq}


@functools.cache
def _refusals() -> list[dict]:
    """docs/gen_config_reference.py's REFUSED_SWAPS, the table docs/CONFIG.md shows."""
    path = project_root() / "docs" / "gen_config_reference.py"
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module.REFUSED_SWAPS


def _cells(experiment: str) -> dict[str, tuple[str, dict]]:
    """{`group=option`: ("ok" or the one-line refusal, the values the refusal rules look at)} for one
    experiment; runs in a worker process."""
    from hydra import compose, initialize_config_dir

    from agecls.config import register_resolvers
    from agecls.training.validation import validate

    register_resolvers()
    _remember_model_checks()
    results = {}
    lines = [f"experiment={experiment}", *REQUIRED.get(experiment, [])]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        _keep_loaded_files(lambda: compose("train", lines))
        chosen = dict(compose("train", lines, return_hydra_config=True).hydra.runtime.choices)
        own = compose("train", lines)
        for group in GROUPS:
            for option in OPTIONS[group]:
                swap = f"{group}={option}"
                cfg = own if chosen[group] == option else compose("train", [*lines, swap])
                facts = {k: OmegaConf.select(cfg, k) for k in ("data.image_size", "scheduler.name")}
                try:
                    validate(cfg)
                    results[swap] = ("ok", facts)
                except ValueError as exc:
                    results[swap] = (str(exc).splitlines()[0], facts)
    return results


def _remember_model_checks() -> None:
    """validate() builds the model on the meta device to check it takes the image size; the 41 swaps of other
    groups check the experiment's own model again, so each distinct check runs once per worker."""
    import json

    from agecls.models import limits

    check, seen = limits.check_input, {}

    def remembered(model_cfg, **kwargs):
        key = json.dumps([model_cfg, kwargs], sort_keys=True, default=str)
        if key not in seen:
            try:
                check(model_cfg, **kwargs)
                seen[key] = None
            except ValueError as exc:
                seen[key] = exc
        if seen[key] is not None:
            raise seen[key]

    limits.check_input = remembered


def _keep_loaded_files(compose_once) -> None:
    """Hydra reads and parses every config file again for each compose (about 0.2 s here); its own per-compose
    cache of loaded files is kept for the worker's life instead, after checking that a config composed
    through it is the one composed without it."""
    from hydra._internal import config_loader_impl

    fresh = OmegaConf.to_container(compose_once())
    make, shared = config_loader_impl.CachingConfigRepository, {}
    config_loader_impl.CachingConfigRepository = lambda repo: shared.setdefault("repo", make(repo))
    compose_once()
    assert OmegaConf.to_container(compose_once()) == fresh


@pytest.fixture(scope="module")
def matrix(request) -> dict[str, dict[str, tuple[str, dict]]]:
    """The cells of the experiments this session runs the swap test for (the named ones at least)."""
    here = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    ran = {item.callspec.params.get("experiment") for item in here if hasattr(item, "callspec")}
    chosen = [e for e in EXPERIMENTS if e in ran or e in NAMED]
    # Hydra composes in about 0.2 s: the cells are spread over the machine's cores
    workers = max(1, min(len(chosen), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return dict(zip(chosen, pool.map(_cells, chosen), strict=True))


def _expected_refusal(swap: str, facts: dict) -> str | None:
    for rule in _refusals():
        if rule["swap"] != swap:
            continue
        key, op, value = rule.get("when") or (None, None, None)
        if key is None or COMPARE[op](facts[key], value):
            return rule["error"]
    return None


@pytest.mark.parametrize(
    "experiment", [e if e in NAMED else pytest.param(e, marks=pytest.mark.heavy) for e in EXPERIMENTS]
)
def test_every_swap_on_the_experiment_composes_and_validates(matrix, experiment):
    wrong = []
    for swap, (outcome, facts) in matrix[experiment].items():
        expected = _expected_refusal(swap, facts)
        if expected is None and outcome != "ok":
            wrong.append(f"experiment={experiment} {swap}: refused: {outcome}")
        elif expected is not None and expected not in outcome:
            wrong.append(f"experiment={experiment} {swap}: expected refusal {expected!r}, got {outcome!r}")
    assert not wrong, "\n".join(wrong)


def test_every_listed_refusal_refuses_something(matrix):
    refused = {swap for cells in matrix.values() for swap, (outcome, _) in cells.items() if outcome != "ok"}
    assert {rule["swap"] for rule in _refusals()} <= refused


def _option_keys(group: str, option: str) -> set[str]:
    """The keys an option has, with those of the options its defaults list builds on (model=agecnn is
    basic_cnn's keys with some values changed)."""
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    keys = set(node) - {"defaults"}
    for base in node.get("defaults") or []:
        if isinstance(base, str) and base != "_self_":
            keys |= _option_keys(group, base)
    return keys


def test_experiments_set_only_keys_every_option_of_a_group_has():
    """An experiment that set a key of one option (model.blocks of the basic CNN) would leave it behind when a
    user swaps the group; such settings belong in a group option (a model preset) the experiment selects."""
    common = {g: set.intersection(*(_option_keys(g, o) for o in OPTIONS[g])) for g in GROUPS}
    pinned = []
    for experiment in EXPERIMENTS:
        overlay = OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml")
        for group in GROUPS:
            set_here = overlay.get(group) or {}
            pinned += [f"{experiment}: {group}.{k}" for k in set_here if k not in common[group]]
    assert not pinned, "keys only some options have: " + ", ".join(pinned)
    assert "lr" in common["optimizer"] and "label_smoothing" in common["task"]
