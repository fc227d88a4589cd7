"""The one LightningModule: a registered model, one output head per predicted attribute, optimizer/scheduler
from config, metrics.

A single task (`task=age|gender|ethnicity`) puts its head on the registry's whole model (`create_model`
with as many outputs as the head needs). `task=multitask` shares the registry's trunk (`create_backbone`)
between one linear layer + head per attribute; the weighted sum of the attributes' losses is trained, each
loss over the faces that have that attribute (-1 targets are masked out of its loss and metrics).

Logged names: a single task logs `{stage}/loss`, `{stage}/macro_f1`, `{stage}/acc` (and `{stage}/mae`, in
years, for heads that predict exact age). Multitask logs `{stage}/{attribute}/...` for every attribute and,
for the objective attribute (`task.objective`), the same scores unprefixed as well (`val/macro_f1`), so
`objective.metric`, checkpointing and early stopping work unchanged.

Two levers of the `augment` group act here rather than in the data pipeline (`agecls.data.batch_augment`):
`augment.mix` mixes training batches (mixup / CutMix; `training_step` only) and `augment.tta=flip` makes every
eval-mode prediction (validation, test, `collect`, `predict*`, hence agecls-eval and agecls-predict, which
read the checkpoint's config) combine each face with its mirror image. Both are off by default and for
checkpoints saved before they existed.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchmetrics import MeanAbsoluteError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from agecls.data.batch_augment import TTA_AUTO, Mix, mix_batch, mix_spec, tta_mode
from agecls.data.bins import AgeBins
from agecls.models import create_model, skip_weights
from agecls.models.registry import create_backbone
from agecls.tasks.classification import ClassificationTask
from agecls.tasks.heads import Head, build_head
from agecls.tasks.multitask import (
    YEARS,
    is_multitask,
    loss_weights,
    objective_attribute,
    target_columns,
    task_attributes,
)

# Model-config keys that are not builder arguments.
_MODEL_META = ("name",)
STAGES = ("train", "val", "test")


def stage_metrics(num_classes: int) -> MetricCollection:
    """Headline macro-F1 and accuracy, tracked per stage."""
    return MetricCollection(
        {
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "acc": MulticlassAccuracy(num_classes, average="micro"),
        }
    )


class FaceClassifier(L.LightningModule):
    """Built from the resolved run config alone, so `load_from_checkpoint(path)` needs nothing else.

    `class_names`: a list (single task) or {attribute: names} (multitask); `class_weights` likewise (a list,
    or {attribute: list | None}) for classification heads; `age_stats` ({"mean", "std"} of the training
    split's ages) standardises the regression head's target. `input_stats` ({"mean", "std"} per channel on
    the 0..1 scale, as the datamodule resolved `data.normalize`; None for `none` and for checkpoints saved
    before it was kept) and `framing` ({finder: the training images' face framing or its error}, see
    agecls.data.faces.framing; None: none) travel in the checkpoint, so agecls-eval and agecls-predict
    normalise and crop as training did without the training run's data (`dataset` statistics are estimated
    from its train split). A bad `augment.mix` block or `augment.tta` raises ValueError naming the key
    here, before any model is built."""

    def __init__(
        self,
        cfg: dict[str, Any],
        class_names: list[str] | dict[str, list[str]],
        class_weights: list[float] | dict[str, list[float] | None] | None = None,
        age_stats: dict[str, float] | None = None,
        input_stats: dict[str, list[float]] | None = None,
        framing: dict[str, dict[str, Any]] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = OmegaConf.create(cfg)
        self.input_stats = input_stats
        augment = self.cfg.get("augment")
        self.mix = mix_spec(augment)
        requested = tta_mode(augment, allow_auto=True)
        # augment.tta=auto: no TTA while training and validating; evaluation.splits.choose_tta picks it after.
        self.tta_auto = requested == TTA_AUTO
        self.tta = "none" if self.tta_auto else requested
        task = self.cfg.task
        self.multitask = is_multitask(task)
        self.attributes = tuple(task_attributes(task))
        self.columns = tuple(target_columns(task))
        self.objective = objective_attribute(task)
        self.loss_weights = loss_weights(task)
        names = dict(class_names) if isinstance(class_names, dict) else {self.attributes[0]: class_names}
        weights = class_weights if isinstance(class_weights, dict) else {self.attributes[0]: class_weights}
        self.class_names = {a: list(names[a]) for a in self.attributes}
        if not self.multitask:
            # The single task's target and classes (read by agecls-eval and the hierarchy).
            self.task = ClassificationTask(
                target=str(task.target),
                class_names=tuple(self.class_names[self.attributes[0]]),
                label_smoothing=float(task.label_smoothing),
            )
        bins = AgeBins.from_config(self.cfg.bins) if "age" in self.attributes else None
        self.heads = nn.ModuleDict(
            {
                a: build_head(
                    str(task.get("head", "classification")) if a == "age" else "classification",
                    len(self.class_names[a]),
                    target=a,
                    bins=bins,
                    label_smoothing=float(task.get("label_smoothing", 0.0)),
                    class_weights=weights.get(a),
                    age_stats=age_stats,
                    regression_loss=str(task.get("regression_loss", "l1")),
                    ldl_sigma=float(task.get("ldl_sigma", 2.0)),
                )
                for a in self.attributes
            }
        )
        model_kwargs = {k: v for k, v in self.cfg.model.items() if k not in _MODEL_META}
        in_chans, image_size = 1 if self.cfg.data.grayscale else 3, int(self.cfg.data.image_size)
        if self.multitask:
            self.model, dim = create_backbone(
                self.cfg.model.name, in_chans=in_chans, image_size=image_size, **model_kwargs
            )
            self.proj = nn.ModuleDict(
                {a: nn.Linear(dim, self.heads[a].out_features) for a in self.attributes}
            )
        else:
            self.model = create_model(
                self.cfg.model.name,
                num_classes=self.heads[self.attributes[0]].out_features,
                in_chans=in_chans,
                image_size=image_size,
                **model_kwargs,
            )
        # ModuleDict keys must not shadow nn.Module attributes (`train`), hence the `stage_attribute` form.
        self.metrics = nn.ModuleDict(
            {f"{s}_{a}": stage_metrics(len(self.class_names[a])) for s in STAGES for a in self.attributes}
        )
        self.mae = nn.ModuleDict(
            {
                f"{s}_{a}": MeanAbsoluteError()
                for s in STAGES
                for a in self.attributes
                if self.heads[a].predicts_years
            }
        )

    # ---- outputs ---------------------------------------------------------------------------------------
    @property
    def tta(self) -> str:
        """Test-time augmentation of eval-mode outputs: `none` or `flip` (from `augment.tta`; settable)."""
        return self._tta

    @tta.setter
    def tta(self, value: str) -> None:
        self._tta = tta_mode({"tta": value})

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each attribute's head logits. In eval mode with `augment.tta=flip`: for the faces and their
        left-right mirror images (one forward pass of both), each head's `Head.average` of the two (mean
        probabilities for softmax heads, mean logits otherwise). Training outputs are never flipped."""
        if self.tta == "flip" and not self.training:
            n = x.shape[0]
            both = self._outputs(torch.cat([x, x.flip(-1)]))
            return {a: self.heads[a].average(torch.stack([o[:n], o[n:]])) for a, o in both.items()}
        return self._outputs(x)

    def _outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.multitask:
            features = self.model(x)
            return {a: self.heads[a](self.proj[a](features)) for a in self.attributes}
        target = self.attributes[0]
        return {target: self.heads[target](self.model(x))}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):  # type: ignore[override]
        """Lightning's loader, without re-reading `model.weights` (the checkpoint holds every tensor, and
        the initial weights file may have moved since training)."""
        with skip_weights():
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Head logits: a tensor for a single task, {attribute: logits} for multitask."""
        out = self.outputs(x)
        return out if self.multitask else out[self.attributes[0]]

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The single task's loss of (logits, labels) (the exact-age target is not passed here)."""
        return self.heads[self.attributes[0]].loss(logits, target)

    def targets(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """{column: (N,) targets} of a batch's target tensor (1-D for one column, else one per column)."""
        if y.ndim == 1:
            return {self.columns[0]: y}
        return {c: y[:, i] for i, c in enumerate(self.columns)}

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: (N, classes) probabilities} in eval mode. Age heads give probabilities over the bins:
        softmax (classification), differences of P(age > bin) (coral, corn), the year distribution summed
        per bin (label_distribution), one-hot on the decoded bin (regression)."""
        with _eval_mode(self):
            out = self.outputs(x)
            return {a: self.heads[a].proba(out[a]) for a in self.attributes}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: (N,) decoded class} in eval mode: the class every metric scores (age: its bin)."""
        with _eval_mode(self):
            out = self.outputs(x)
            return {a: self.heads[a].decode(out[a]) for a in self.attributes}

    @torch.no_grad()
    def predict_years(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: (N,) predicted age in years} for heads that predict exact age (else empty)."""
        with _eval_mode(self):
            out = self.outputs(x)
            return {a: self.heads[a].years(out[a]) for a in self.attributes if self.heads[a].predicts_years}

    @torch.no_grad()
    def collect(self, loader) -> dict[str, dict[str, torch.Tensor]]:
        """Every batch of `loader` predicted (eval mode, on the module's device): {attribute: {"preds",
        "labels"} (-1 labels where a face lacks the attribute), "proba" ((N, classes), as `predict_proba`),
        plus {"years", "true_years"} for heads that predict exact age}."""
        parts: dict[str, dict[str, list[torch.Tensor]]] = {a: {} for a in self.attributes}
        with _eval_mode(self):
            for x, y in loader:
                out = self.outputs(x.to(self.device))
                targets = self.targets(y)
                for a in self.attributes:
                    head = self.heads[a]
                    got = {
                        "preds": head.decode(out[a]).cpu(),
                        "labels": targets[a],
                        "proba": head.proba(out[a]).cpu(),
                    }
                    if head.predicts_years:
                        got["years"] = head.years(out[a]).cpu()
                        got["true_years"] = targets[YEARS]
                    for k, v in got.items():
                        parts[a].setdefault(k, []).append(v)
        return {a: {k: torch.cat(v) for k, v in d.items()} for a, d in parts.items()}

    def predict_loader(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted class and true label for every batch of `loader` (a single task's target; for multitask
        the objective attribute's)."""
        got = self.collect(loader)[self.objective]
        return got["preds"], got["labels"]

    # ---- training ---------------------------------------------------------------------------------------
    def total_loss(
        self, out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], mix: Mix | None = None
    ) -> tuple[torch.Tensor, dict[str, dict[str, Any]]]:
        """The weighted sum of the attributes' losses, each over the faces that have the attribute (target
        >= 0), and per attribute {loss, logits, labels, years} of those faces (attributes no face of the
        batch has are left out).

        With `mix` (a mixed training batch: face i holds `lam` of itself and `1 - lam` of face `perm[i]`),
        each attribute's loss is `lam * loss(own targets) + (1 - lam) * loss(partner's targets)`, over the
        pairs where both faces have the attribute (a face mixed with one lacking it would be pulled towards
        an unknown label, so that pair is left out of that attribute only). The parts' labels and years are
        the faces' own (un-permuted) ones, so training metrics under mixing score each mixed image against
        its own label."""
        total = next(iter(out.values())).new_zeros(())
        parts: dict[str, dict[str, Any]] = {}
        for a in self.attributes:
            head: Head = self.heads[a]
            keep = targets[a] >= 0
            if mix is not None:
                keep = keep & (targets[a][mix.perm] >= 0)
            if not bool(keep.any()):
                continue
            logits, labels = out[a][keep], targets[a][keep]
            years = targets[YEARS][keep].float() if head.predicts_years else None
            loss = head.loss(logits, labels, years)
            if mix is not None:
                other = targets[a][mix.perm][keep]
                other_years = targets[YEARS][mix.perm][keep].float() if head.predicts_years else None
                loss = mix.lam * loss + (1.0 - mix.lam) * head.loss(logits, other, other_years)
            total = total + self.loss_weights[a] * loss
            parts[a] = {"loss": loss, "logits": logits, "labels": labels, "years": years}
        return total, parts

    def _step(self, batch, stage: str, mix: Mix | None = None) -> torch.Tensor:
        x, y = batch
        total, parts = self.total_loss(self.outputs(x), self.targets(y), mix)
        for a, part in parts.items():
            head: Head = self.heads[a]
            logits = part["logits"].detach()
            self.metrics[f"{stage}_{a}"].update(head.decode(logits), part["labels"])
            if head.predicts_years:
                self.mae[f"{stage}_{a}"].update(head.years(logits), part["years"])
            if self.multitask:
                self.log(
                    f"{stage}/{a}/loss", part["loss"], on_step=False, on_epoch=True, batch_size=len(logits)
                )
        self.log(
            f"{stage}/loss", total, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=len(y)
        )
        return total

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """One step on the batch, mixed first when `augment.mix` says so (see `total_loss`)."""
        x, y = batch
        x, mix = mix_batch(x, self.mix)
        return self._step((x, y), "train", mix)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _epoch_end(self, stage: str) -> None:
        for a in self.attributes:
            metrics = self.metrics[f"{stage}_{a}"]
            updated = all(m.update_called for m in metrics.values())
            values = dict(metrics.compute()) if updated else {}
            metrics.reset()
            key = f"{stage}_{a}"
            if key in self.mae:
                if self.mae[key].update_called:
                    values["mae"] = self.mae[key].compute()
                self.mae[key].reset()
            names = {}
            if self.multitask:
                names.update({f"{stage}/{a}/{k}": v for k, v in values.items()})
            if a == self.objective:
                names.update({f"{stage}/{k}": v for k, v in values.items()})
            self.log_dict(names, prog_bar=stage == "val" and a == self.objective)

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the heads kept the cross-entropy's class weights as `loss.weight`;
        they are rebuilt from the hyperparameters now."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("loss.")]:
            del state[key]

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


class _eval_mode:
    """Context manager: the module in eval mode inside, its previous mode restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)
