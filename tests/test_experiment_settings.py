"""Each dissertation experiment resolves to the training settings it was written with: moving a setting into a
group option (a model preset, an optimizer's own defaults) must not change what the experiment trains.

tests/golden/experiments.json holds every experiment's composed config (without the hydra node), as it was
before experiments stopped setting keys of a single group option. An intended change to an experiment
rewrites it: `python tests/test_experiment_settings.py --write`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agecls.config import CONFIG_DIR, register_resolvers

GOLDEN = Path(__file__).parent / "golden" / "experiments.json"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def settings(experiment: str) -> dict:
    """The experiment's config as composed, interpolations unresolved (no machine's paths in it)."""
    register_resolvers()
    extra = ["data.root=/data/UTKFace"] if experiment == "utkface" else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", *extra])
    return OmegaConf.to_container(cfg, resolve=False)


def test_golden_lists_every_experiment():
    assert sorted(json.loads(GOLDEN.read_text())) == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_resolves_to_its_recorded_settings(experiment):
    recorded = json.loads(GOLDEN.read_text())[experiment]
    now = settings(experiment)
    changed = sorted(
        f"{group}: {recorded.get(group)!r} -> {now.get(group)!r}"
        for group in set(recorded) | set(now)
        if recorded.get(group) != now.get(group)
    )
    assert not changed, "\n".join(changed)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps({e: settings(e) for e in EXPERIMENTS}, indent=1, sort_keys=True) + "\n")
