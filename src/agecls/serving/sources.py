"""Where models come from: checkpoint files and MLflow registry references, and the card shown beside answers.

`ckpt` is a checkpoint file or a registered model `models:/NAME@ALIAS` | `models:/NAME/VERSION`; a registered
version's artifacts are downloaded into a folder the caller owns (`resolve_models(..., dest)`), and a
registered ensemble resolves to all its members. `model_card` says what a user needs to judge a model's
answers: its file or registered version, MLflow run, training data and validation macro-F1.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agecls.errors import UsageError

log = logging.getLogger(__name__)

# A registered ensemble's members are saved under these names (agecls.serving.mlflow_model.save_pyfunc).
MEMBER_PREFIX = "member-"


@dataclass
class Source:
    """Where a checkpoint came from: `spec` as given (a file path or models:/...), and for a registered model
    its name, version and MLflow run id."""

    spec: str
    registered: str | None = None
    version: str | None = None
    run_id: str | None = None
    tracking_uri: str | None = None


def resolve_checkpoint(spec: str, tracking_uri: str | None, dest: Path) -> Path:
    """A checkpoint file: `spec` itself, or for models:/NAME@ALIAS | models:/NAME/VERSION the registered
    version's checkpoint (the .ckpt in its artifact folder, best.ckpt when there are several)."""
    return resolve_model(spec, tracking_uri, dest)[0]


def resolve_model(spec: str, tracking_uri: str | None, dest: Path) -> tuple[Path, Source]:
    """resolve_checkpoint's file and where it came from (registered name, version, run id); UsageError for a
    registered ensemble (resolve_models gives its members)."""
    found = resolve_models(spec, tracking_uri, dest)
    if len(found) > 1:
        raise UsageError(f"ckpt={spec}: an ensemble of {len(found)} checkpoints, not one")
    return found[0]


def resolve_models(spec: str, tracking_uri: str | None, dest: Path) -> list[tuple[Path, Source]]:
    """The checkpoint file(s) of `spec` with where they came from: the file itself, or a registered
    version's checkpoint (the .ckpt in its artifacts, best.ckpt when there are several), or every member of a
    registered ensemble (member-0.ckpt, member-1.ckpt, ...), downloaded into `dest`, which the caller owns
    and removes once it no longer needs the files."""
    if not spec.startswith("models:/"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"ckpt={spec}: no such checkpoint file")
        return [(path, Source(str(path.resolve())))]
    import mlflow

    local, version = _download(spec, tracking_uri, dest)
    files = [local] if local.is_file() else sorted(local.rglob("*.ckpt"))
    members = sorted(
        (f for f in files if f.name.startswith(MEMBER_PREFIX)),
        key=lambda f: int(f.stem[len(MEMBER_PREFIX) :]) if f.stem[len(MEMBER_PREFIX) :].isdigit() else -1,
    )
    if len(files) > 1:
        files = members or [f for f in files if f.name == "best.ckpt"]
    if not files or (len(files) > 1 and not members):
        raise UsageError(f"ckpt={spec}: its artifacts {version.source} hold no single checkpoint (*.ckpt)")
    uri = tracking_uri or mlflow.get_tracking_uri()
    source = Source(spec, version.name, str(version.version), version.run_id or None, uri)
    return [(f, source) for f in files]


def _download(spec: str, tracking_uri: str | None, dest: Path) -> tuple[Path, Any]:
    """The registered version `spec` names (models:/NAME@ALIAS | models:/NAME/VERSION) and its artifacts
    downloaded into `dest`; UsageError when the store cannot resolve it."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    ref = spec[len("models:/") :]
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise UsageError(f"ckpt={spec}: give models:/NAME@ALIAS or models:/NAME/VERSION")
        log.debug("%s: downloading %s into %s", spec, version.source, dest)
        # a progress bar on the console would be the only thing a user sees of a local copy
        with _environment("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=version.source, dst_path=str(dest), tracking_uri=tracking_uri
            )
    except MlflowException as exc:
        raise UsageError(
            f"ckpt={spec}: cannot resolve it in the MLflow store {tracking_uri}: {exc}"
        ) from None
    return Path(local), version


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """The environment variable `name` set to `value` for the block, then as it was (unset if it was)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


VAL_METRIC = "val/macro_f1"


def _best_from_checkpoint(path: Path) -> float | None:
    """The best validation macro-F1 Lightning's ModelCheckpoint kept in the checkpoint (when it monitored
    that metric)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - the weights loaded already; a missing score is only missing
        log.debug("%s: no validation score read (%s)", path, exc)
        return None
    for key, value in (state.get("callbacks") or {}).items():
        if (
            key.startswith("ModelCheckpoint")
            and isinstance(value, dict)
            and value.get("monitor") == VAL_METRIC
        ):
            score = value.get("best_model_score")
            if score is not None:
                return float(score)
    return None


def _run_facts(run_id: str, tracking_uri: str | None) -> dict[str, Any]:
    """{manifest_hash, root, scores: the run's best_val/* and val/* macro-F1 metrics} of an MLflow run,
    whatever of them the store has; {} when the store or the run cannot be read (the card is informative,
    never a reason to refuse a model)."""
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception as exc:  # noqa: BLE001
        log.debug("run %s in %s: unreadable for the model card (%s)", run_id, tracking_uri, exc)
        return {}
    metrics, tags = run.data.metrics, run.data.tags
    return {
        "manifest_hash": tags.get("data.manifest_hash"),
        "root": tags.get("data.root"),
        "scores": {k: float(v) for k, v in metrics.items() if k.endswith("macro_f1")},
    }


def val_scores(
    recorded: dict[str, Any], attributes: list[str], objective: str | None
) -> dict[str, float | None]:
    """Each attribute's validation macro-F1 from a run's recorded metrics (results.json or MLflow): a
    multitask run's `best_val/ATTR/macro_f1`; the objective attribute's (or a single task's) also unprefixed,
    `best_val/macro_f1`, else its last `val/macro_f1`."""
    scores: dict[str, float | None] = {}
    for attr in attributes:
        keys = [f"best_val/{attr}/macro_f1"]
        if attr == objective or len(attributes) == 1:
            keys += [f"best_{VAL_METRIC}", VAL_METRIC]
        found = next((recorded[k] for k in keys if recorded.get(k) is not None), None)
        scores[attr] = None if found is None else round(float(found), 4)
    return scores


def _local_store(uri: Any) -> bool:
    """A sqlite file or file: store that exists here: read without a network round trip."""
    text = str(uri or "")
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///") :]).is_file()
    if text.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(text).path).exists()
    return False


def model_card(path: Path, module: Any, source: Source | None = None) -> dict[str, Any]:
    """What a user needs to judge a model's answers: where it came from (file or registry name, version and
    MLflow run), the attributes it predicts, the data it was trained on and each attribute's validation
    macro-F1 (`val_macro_f1` is the objective attribute's)."""
    source = source or Source(str(Path(path).resolve()))
    cfg = getattr(module, "cfg", None)
    data = cfg.get("data") if cfg is not None and hasattr(cfg, "get") else None
    names = getattr(module, "class_names", None)
    attributes = list(names) if isinstance(names, dict) else [str(cfg.task.target)] if cfg is not None else []
    objective = getattr(module, "objective", None) or (attributes[0] if attributes else None)
    run_id, recorded = source.run_id, {}
    results_file = Path(path).parent.parent / "results.json"  # a run's folder holds checkpoints/ and it
    if source.registered is None and results_file.is_file():
        try:
            recorded = json.loads(results_file.read_text())
            run_id = run_id or recorded.get("mlflow_run_id")
        except (OSError, ValueError):
            recorded = {}
    facts: dict[str, Any] = {}
    uri = source.tracking_uri
    if uri is None and data is not None and cfg.get("tracking") is not None:
        uri = cfg.tracking.get("tracking_uri")
        uri = uri if _local_store(uri) else None
    if run_id and (source.registered is not None or uri):
        facts = _run_facts(run_id, uri)
    scores = val_scores({**facts.get("scores", {}), **recorded}, attributes, objective)
    if objective in scores and scores[objective] is None:
        best = _best_from_checkpoint(Path(path))
        scores[objective] = None if best is None else round(best, 4)
    name = str(data.get("name")) if data is not None and data.get("name") is not None else None
    root = facts.get("root") or (str(data.get("root")) if data is not None and data.get("root") else None)
    manifest = facts.get("manifest_hash")
    return {
        "source": source.spec,
        "registered": source.registered,
        "version": source.version,
        "run_id": run_id,
        "attributes": attributes,
        "data": {"name": name, "root": root, "manifest_hash": manifest[:12] if manifest else None},
        "val_macro_f1": scores.get(objective) if objective else None,
        "val_macro_f1_by_attribute": scores,
        "synthetic": name == "synthetic",
    }


def describe_model(card: dict[str, Any]) -> str:
    """One line: 'models:/agecls-demo@best (version 1, MLflow run a70f015f): age; trained on synthetic (ROOT,
    manifest 1a2b3c4d5e6f); validation macro-F1 0.512' (several attributes: 'age 0.556, gender 0.871')."""
    where = card["source"]
    extra = [f"version {card['version']}"] if card.get("version") else []
    if card.get("run_id"):
        extra.append(f"MLflow run {card['run_id']}")
    if extra:
        where += f" ({', '.join(extra)})"
    data = card.get("data") or {}
    trained = data.get("name") or "unknown data"
    details = [
        d for d in (data.get("root"), data.get("manifest_hash") and f"manifest {data['manifest_hash']}") if d
    ]
    if details:
        trained += f" ({', '.join(details)})"
    return f"{where}: {', '.join(card['attributes'])}; trained on {trained}; {score_text(card)}"


def score_text(card: dict[str, Any]) -> str:
    """'validation macro-F1 0.512' for one attribute; 'validation macro-F1 age 0.556, gender 0.871,
    ethnicity 0.431' for several (unknown where the run recorded none)."""
    scores = card.get("val_macro_f1_by_attribute") or {}

    def shown(score: float | None) -> str:
        return "unknown" if score is None else f"{score:.3f}"

    if len(card["attributes"]) < 2 or not scores:
        return f"validation macro-F1 {shown(card.get('val_macro_f1'))}"
    return "validation macro-F1 " + ", ".join(f"{a} {shown(scores.get(a))}" for a in card["attributes"])


SYNTHETIC_WARNING = (
    "trained on generated synthetic faces, not real photos: its predictions on real faces are not meaningful"
)
