"""The one LightningModule: a registered model, a task's loss, optimizer/scheduler from config, metrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from agecls.models import create_model
from agecls.tasks.classification import ClassificationTask

# Model-config keys that are not builder arguments.
_MODEL_META = ("name",)


def stage_metrics(num_classes: int) -> MetricCollection:
    """Headline macro-F1 and accuracy, tracked per stage."""
    return MetricCollection(
        {
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "acc": MulticlassAccuracy(num_classes, average="micro"),
        }
    )


class FaceClassifier(L.LightningModule):
    """Built from the resolved run config alone, so `load_from_checkpoint(path)` needs nothing else."""

    def __init__(self, cfg: dict[str, Any], class_names: list[str], class_weights: list[float] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = OmegaConf.create(cfg)
        self.task = ClassificationTask(
            target=self.cfg.task.target,
            class_names=tuple(class_names),
            label_smoothing=float(self.cfg.task.label_smoothing),
        )
        model_kwargs = {k: v for k, v in self.cfg.model.items() if k not in _MODEL_META}
        self.model = create_model(
            self.cfg.model.name,
            num_classes=self.task.num_classes,
            in_chans=1 if self.cfg.data.grayscale else 3,
            image_size=int(self.cfg.data.image_size),
            **model_kwargs,
        )
        self.loss = self.task.loss_fn(class_weights)
        n = self.task.num_classes
        # ModuleDict keys must not shadow nn.Module attributes (`train`), hence the suffix.
        self.metrics = torch.nn.ModuleDict({f"{s}_": stage_metrics(n) for s in ("train", "val", "test")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.no_grad()
    def predict_loader(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted class and true label for every batch of `loader` (eval mode, on the module's device)."""
        was_training = self.training
        self.eval()
        preds, labels = [], []
        for x, y in loader:
            preds.append(self(x.to(self.device)).argmax(dim=1).cpu())
            labels.append(y)
        self.train(was_training)
        return torch.cat(preds), torch.cat(labels)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        preds = logits.argmax(dim=1)
        self.metrics[f"{stage}_"].update(preds, y)
        self.log(
            f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=len(y)
        )
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _epoch_end(self, stage: str) -> None:
        values = self.metrics[f"{stage}_"].compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        self.metrics[f"{stage}_"].reset()

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def configure_optimizers(self):
        optimizer = instantiate(self.cfg.optimizer, _convert_="all")(params=self.parameters())
        sched_cfg = self.cfg.scheduler
        if sched_cfg.name == "none":
            return optimizer
        # Arguments only known once training starts, named in config: {arg: trainer attribute}.
        extra = {
            arg: int(getattr(self.trainer, attr)) for arg, attr in sched_cfg.get("from_trainer", {}).items()
        }
        scheduler = instantiate(sched_cfg.params, _convert_="all")(optimizer, **extra)
        config = {"scheduler": scheduler, "interval": sched_cfg.interval}
        if "monitor" in sched_cfg:
            config["monitor"] = sched_cfg.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}
