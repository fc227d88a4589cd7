"""A checkpoint as an MLflow Model with the `python_function` flavor, so MLflow itself can load and serve it.

`mlflow.pyfunc.load_model("models:/agecls-demo@best").predict(frame)` takes a DataFrame with one column
`image` (encoded image bytes: JPEG, PNG, ...; base64 strings in `mlflow models serve`'s JSON) and answers
one row per face: the image's row number, the face number and box, and for each attribute the model predicts
its class and probability. With `detect` on (the default) each image is a photo whose faces are found first,
as agecls-predict does; with it off each image is already a face crop.

The model folder holds the checkpoint under `artifacts/`, so agecls-predict and agecls-serve also take the
registered `models:/...` directly (they look for the .ckpt inside). An ensemble (a study's chosen
configuration over its seeds, when validation prefers it to the best seed alone) holds its members as
member-0.ckpt, member-1.ckpt, ..., and answers with their mean class probabilities."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from agecls.serving.faces import DEFAULT_MAX_PIXELS
from agecls.serving.predict import Predictor, load_model
from agecls.serving.sources import MEMBER_PREFIX

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"  # the artifact's name; an ensemble's members: checkpoint, checkpoint_1, ...


def _member_keys(artifacts: dict[str, Any]) -> list[str]:
    """The checkpoint artifacts of a saved model in member order (one for a single checkpoint)."""
    keys = [k for k in artifacts if k == CHECKPOINT or k.startswith(f"{CHECKPOINT}_")]
    return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]) if k != CHECKPOINT else 0)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agecls")
    except PackageNotFoundError:
        return "0"


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):  # JSON transports carry binary columns as base64 text
        return base64.b64decode(value)
    raise TypeError(f"image: expected encoded image bytes (or base64 text), got {type(value).__name__}")


def _images(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"expected a column 'image'; got columns {list(model_input.columns)}")
        return list(model_input["image"])
    if isinstance(model_input, dict) and "image" in model_input:
        return list(model_input["image"])
    if isinstance(model_input, list | tuple):
        return list(model_input)
    raise TypeError("expected a DataFrame with an 'image' column of encoded image bytes")


def predictions_frame(results: list[dict[str, Any]], attributes: list[str]) -> pd.DataFrame:
    """One row per face (one row with status no_face/error for an image without one)."""
    rows = []
    for index, result in enumerate(results):
        base = {"image": index, "status": result["status"], "error": result.get("error", "")}
        if not result["faces"]:
            rows.append({**base, "face": -1, "box": ""})
            continue
        for face in result["faces"]:
            row = {**base, "face": int(face["face"]), "box": ",".join(str(int(v)) for v in face["box"])}
            for attr in attributes:
                row[attr] = face[attr]["label"]
                row[f"{attr}_prob"] = float(face[attr]["prob"])
            rows.append(row)
    columns = ["image", "face", "box", "status", "error"]
    columns += [c for attr in attributes for c in (attr, f"{attr}_prob")]
    return pd.DataFrame(rows, columns=columns)


class FaceClassifier(mlflow.pyfunc.PythonModel):
    """agecls's Predictor behind MLflow's pyfunc interface (pickled by reference: the loading process imports
    agecls, which `mlflow models serve --env-manager local` and the model's pip requirement provide)."""

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.predictor = Predictor(
            [load_model(Path(context.artifacts[k])) for k in _member_keys(context.artifacts)],
            detect=bool(config.get("detect", True)),
            max_pixels=int(config.get("max_pixels", DEFAULT_MAX_PIXELS)),
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        results = [
            self.predictor.predict_file(_as_bytes(img), name=f"image {i}")
            for i, img in enumerate(_images(model_input))
        ]
        return predictions_frame(results, list(self.predictor.class_names))


def example_image(size: int = 64) -> bytes:
    """A small JPEG of a generated face: the model's input example."""
    from PIL import Image

    from agecls.data.synthetic import render_face

    buf = io.BytesIO()
    pixels = render_face(40, 1, 0, np.random.default_rng(0), size=size)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def save_pyfunc(
    checkpoint: Path | list[Path], path: Path, *, detect: bool = True, version: str | None = None
) -> Path:
    """Write the checkpoint (or an ensemble's, a list) as an MLflow Model folder at `path` (python_function
    flavor, signature, an input example of one generated face); returns `path`."""
    import shutil
    import tempfile

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    checkpoints = [checkpoint] if isinstance(checkpoint, Path | str) else list(checkpoint)
    predictor = Predictor([load_model(Path(c)) for c in checkpoints], detect=False)
    attributes = list(predictor.class_names)
    outputs = [ColSpec("long", "image"), ColSpec("long", "face"), ColSpec("string", "box")]
    outputs += [ColSpec("string", "status"), ColSpec("string", "error")]
    for attr in attributes:
        outputs += [ColSpec("string", attr), ColSpec("double", f"{attr}_prob")]
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema(outputs))
    metadata = {"agecls.attributes": json.dumps({a: predictor.class_names[a] for a in attributes})}
    with tempfile.TemporaryDirectory(prefix="agecls-members-") as tmp:
        if len(checkpoints) == 1:
            artifacts = {CHECKPOINT: str(checkpoints[0])}
        else:  # members keep distinct names in the model folder (each run's file is best.ckpt)
            artifacts = {}
            for i, ckpt in enumerate(checkpoints):
                member = Path(tmp) / f"{MEMBER_PREFIX}{i}.ckpt"
                shutil.copyfile(ckpt, member)
                artifacts[CHECKPOINT if i == 0 else f"{CHECKPOINT}_{i}"] = str(member)
            metadata["agecls.members"] = str(len(checkpoints))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=FaceClassifier(),
            artifacts=artifacts,
            signature=signature,
            input_example=pd.DataFrame({"image": [example_image()]}),
            # Declared, not inferred: inferring loads the model in a subprocess and guesses a long list.
            pip_requirements=[f"agecls=={version or package_version()}"],
            model_config={"detect": detect},
            metadata=metadata,
        )
    return path


def _best_checkpoint(tracking_uri: str, run_id: str, dst: Path) -> Path:
    """The run's best checkpoint (its `checkpoints` artifacts: best.ckpt, else the only .ckpt), downloaded."""
    from mlflow.artifacts import download_artifacts

    dst.mkdir(parents=True, exist_ok=True)
    local = Path(
        download_artifacts(
            run_id=run_id, artifact_path="checkpoints", dst_path=str(dst), tracking_uri=tracking_uri
        )
    )
    found = sorted(local.rglob("*.ckpt"))
    best = [f for f in found if f.name == "best.ckpt"] or found
    if not best:
        raise FileNotFoundError(f"run {run_id}: no checkpoint (*.ckpt) under its artifacts 'checkpoints'")
    return best[0]


def register_ensemble_model(
    tracking_uri: str, run_ids: list[str], name: str, alias: str, *, record_run: str, detect: bool = True
) -> str:
    """Register the runs' best checkpoints as one ensemble model (mean class probabilities), logged as the
    MLflow Model `ensemble_model` of `record_run` (a study's parent run) and registered as a version of
    `name` with `alias` and the tag agecls.members (the member runs); returns the version. The same members
    registered before keep their version (the alias moves to it)."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    with contextlib.suppress(MlflowException):
        client.create_registered_model(name)
    members = ",".join(run_ids)
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("agecls.members") == members:
            client.set_registered_model_alias(name, alias, version.version)
            return str(version.version)
    with tempfile.TemporaryDirectory(prefix="agecls-register-") as tmp:
        ckpts = [_best_checkpoint(tracking_uri, r, Path(tmp) / f"run-{i}") for i, r in enumerate(run_ids)]
        model_dir = save_pyfunc(ckpts, Path(tmp) / "model", detect=detect)
        client.log_artifacts(record_run, str(model_dir), "ensemble_model")
    source = f"{client.get_run(record_run).info.artifact_uri}/ensemble_model"
    version = client.create_model_version(name, source, run_id=record_run, tags={"agecls.members": members})
    client.set_registered_model_alias(name, alias, version.version)
    log.debug("registered %s version %s (@%s) from %s", name, version.version, alias, source)
    return str(version.version)


def register_run_model(
    tracking_uri: str, run_id: str, name: str, alias: str = "best", *, detect: bool = True
) -> str:
    """Log the run's best checkpoint (its `checkpoints` artifacts) as the MLflow Model `model` of that run and
    register it as a version of `name` with `alias`; returns the version. A run already registered under
    `name` keeps its version (the alias moves to it)."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    with contextlib.suppress(MlflowException):  # registered by an earlier session or another worker
        client.create_registered_model(name)
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            client.set_registered_model_alias(name, alias, version.version)
            return str(version.version)
    with tempfile.TemporaryDirectory(prefix="agecls-register-") as tmp:
        best = _best_checkpoint(tracking_uri, run_id, Path(tmp) / "run")
        model_dir = save_pyfunc(best, Path(tmp) / "model", detect=detect)
        client.log_artifacts(run_id, str(model_dir), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source, run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    log.debug("registered %s version %s (@%s) from %s", name, version.version, alias, source)
    return str(version.version)
