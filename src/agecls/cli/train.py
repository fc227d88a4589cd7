"""`agecls-train`: one Hydra-configured training run, or with -m a sweep of them (grid or Optuna study)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from agecls.config import CONFIG_DIR
from agecls.training.task import run_task


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The objective of the run goes back to Hydra, so its sweepers can optimise it."""
    return run_task(cfg)


if __name__ == "__main__":
    main()
