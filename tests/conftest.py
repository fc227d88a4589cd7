"""Shared fixtures: every test writes under a temporary output folder, never the repo's outputs/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from agecls.config import CONFIG_DIR, register_resolvers

# session fixtures that start real engines (Slurm, PostgreSQL, an MLflow server) for `-m cluster`
pytest_plugins = ["tests.engines"]

# A run small enough for a unit test: ~300 synthetic faces at 32 px, a 2-block CNN.
FAST_OVERRIDES = [
    "data.synthetic.n=400",
    "data.image_size=32",
    "data.batch_size=32",
    "model.blocks=2",
    "model.base_channels=8",
    "model.hidden=32",
    "optimizer.lr=3e-3",
    "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false",
    "data.framing_images=16",  # a face framing fitted on real images (data.framing=fit) in seconds
]


@pytest.fixture(scope="session")
def output_dir(tmp_path_factory) -> Path:
    """One output folder per test session (synthetic data and caches are shared between tests)."""
    path = tmp_path_factory.mktemp("outputs")
    os.environ["AGECLS_OUTPUT_DIR"] = str(path)
    return path


# Tests compose with Hydra's API directly: register agecls's resolvers first, as agecls-train's main() does.
register_resolvers()


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    """The real train config, composed as `agecls-train` would with these overrides."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


@pytest.fixture
def compose_cfg(output_dir):
    """Compose the train config with AGECLS_OUTPUT_DIR pointing at the session's temp folder."""
    return compose_train


@pytest.fixture(scope="session")
def tiny_multitask_ckpt(output_dir) -> Path:
    """One tiny multitask checkpoint (age, gender, ethnicity; 1 epoch on 200 synthetic 32 px faces) shared by
    the agecls-predict and agecls-serve tests."""
    from agecls.training.train import train

    overrides = [*FAST_OVERRIDES, "data.synthetic.n=200", "trainer.max_epochs=1", "task=multitask"]
    result = train(compose_train([*overrides, "tracking.experiment=predict-src"]))
    return Path(result["checkpoint"])
