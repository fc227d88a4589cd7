"""One inference path: for the same face file, post-fit test scoring (the datamodule's eval loader, on the
loader and the device pipeline), agecls-eval (one checkpoint and an ensemble), agecls-predict and
agecls-serve (detect=false) hand the model the identical tensor and get identical predictions; for a
greyscale and an RGB checkpoint, with data.normalize none, imagenet and dataset, with and without a crop
margin (the eval transform's centre crop)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.cli.eval import parse_args as eval_args
from agecls.cli.predict import parse_args as predict_args
from agecls.data.cache import decode_image
from agecls.data.prepare import prepare_data
from agecls.evaluation.evaluate import evaluate
from agecls.evaluation.inference import Preprocess, load_checkpoint
from agecls.serving.predict import Predictor
from agecls.tasks.module import FaceClassifier
from agecls.training.train import build_datamodule, train

pytestmark = pytest.mark.slow

# float32, contiguous: the paths are compared bit for bit, and `auto` on a bf16 CPU (channels-last) lets
# oneDNN pick its kernel by each input's memory layout, whose last bits differ
TINY = [
    *FAST_OVERRIDES,
    "data.synthetic.n=200",
    "trainer.max_epochs=1",
    "tracking.enabled=false",
    "trainer.precision=32-true",
    "trainer.channels_last=false",
]
# name -> overrides of one more tiny run (the greyscale multitask one without normalisation or margin is
# the shared `tiny_multitask_ckpt`)
RUNS = {
    "grey-imagenet-margin5": ["task=gender", "data.normalize=imagenet", "data.crop_margin=5"],
    "rgb-dataset-margin4": [
        "task=multitask",
        "data.normalize=dataset",
        "data.grayscale=false",
        "data.crop_margin=4",
    ],
}


@pytest.fixture(scope="module", params=["grey-none", *RUNS])
def ckpt(request, tiny_multitask_ckpt) -> Path:
    if request.param == "grey-none":
        return tiny_multitask_ckpt
    return Path(train(compose_train([*TINY, *RUNS[request.param]]))["checkpoint"])


@pytest.fixture
def seen(monkeypatch) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Every (input, per-attribute logits) a FaceClassifier computes while the test runs, on the CPU."""
    original = FaceClassifier._outputs

    def spy(self, x):
        out = original(self, x)
        seen.append((x.detach().cpu().clone(), {a: o.detach().cpu().clone() for a, o in out.items()}))
        return out

    seen: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    monkeypatch.setattr(FaceClassifier, "_outputs", spy)
    return seen


def _only(seen: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The one forward pass made since the last call (and forget it)."""
    assert len(seen) == 1, f"{len(seen)} forward passes"
    return seen.pop()


def test_every_path_hands_the_model_the_same_tensor_and_predicts_the_same(ckpt, seen, output_dir, tmp_path):
    module = load_checkpoint(ckpt)
    run_cfg = OmegaConf.create(OmegaConf.to_container(module.cfg))
    run_cfg.data.batch_size = 1  # each path scores the face alone, so the forward passes are alike
    assert module.tta == "none"
    preprocess = Preprocess.of(module)
    channels = 1 if run_cfg.data.grayscale else 3
    size = int(run_cfg.data.image_size) + int(run_cfg.data.crop_margin)
    assert preprocess.size == size and (preprocess.transform is None) == (run_cfg.data.crop_margin == 0)
    if run_cfg.data.normalize == "none":
        assert preprocess.mean is None and module.input_stats is None
    else:
        assert preprocess.mean.tolist() == module.input_stats["mean"] and len(preprocess.mean) == channels

    # post-fit test scoring: the run's datamodule (its own split and cache), the first face of its test split
    prepared = prepare_data(run_cfg.data, run_cfg.paths)
    datamodule, _ = build_datamodule(run_cfg, prepared)
    assert datamodule.pipeline == "loader"
    row = int(datamodule.indices["test"][0])
    face = Path(prepared.manifest.root) / prepared.manifest.df["path"].iloc[row]
    scored = module.collect(itertools.islice(datamodule.eval_dataloader("test"), 1))
    x_fit, out_fit = _only(seen)
    assert x_fit.shape == (1, channels, 32, 32) and x_fit.dtype == torch.float32
    assert np.array_equal(prepared.images[row], decode_image(face, size, bool(run_cfg.data.grayscale)))
    assert torch.equal(x_fit[0], preprocess.tensor(prepared.images[row]))

    device_cfg = OmegaConf.create(OmegaConf.to_container(run_cfg))
    device_cfg.data.pipeline = "device"  # the same batch assembled by DeviceBatches (here on the CPU)
    device_batches = build_datamodule(device_cfg, prepared)[0].eval_dataloader("test")
    module.collect(itertools.islice(device_batches, 1))
    x_device, out_device = _only(seen)
    assert torch.equal(x_device, x_fit)
    for attr, logits in out_fit.items():
        assert torch.equal(out_device[attr], logits), attr

    # agecls-eval on a folder holding that one file: one checkpoint, and an ensemble of two copies of it
    folder = tmp_path / "faces"
    folder.mkdir()
    shutil.copy(face, folder / face.name)
    common = [f"data.root={folder}", "tracking.enabled=false", f"paths.cache_dir={tmp_path}/cache"]
    report = evaluate(eval_args([f"ckpt={ckpt}", *common]))
    x_eval, out_eval = _only(seen)
    twin = tmp_path / "twin.ckpt"
    shutil.copy(ckpt, twin)
    ensemble = evaluate(eval_args([f"ckpt=[{ckpt},{twin}]", *common]))
    (x_a, out_a), (x_b, out_b) = seen
    seen.clear()

    # agecls-predict and agecls-serve take the file as a photo that is already a face crop
    predictor = Predictor.from_config(predict_args([f"ckpt={ckpt}", "images=-", "detect=false"]))
    predicted = predictor.predict_file(face)
    x_predict, out_predict = _only(seen)

    from fastapi.testclient import TestClient

    from agecls.serving.serve import create_app

    with TestClient(create_app(predictor)) as client:
        served = client.post("/api/predict", files={"file": (face.name, face.read_bytes(), "image/jpeg")})
    assert served.status_code == 200, served.text
    x_serve, out_serve = _only(seen)

    for name, x in {"eval": x_eval, "ensemble a": x_a, "ensemble b": x_b, "predict": x_predict}.items():
        assert torch.equal(x, x_fit), name
    assert torch.equal(x_serve, x_fit)
    for name, out in {
        "eval": out_eval,
        "ensemble a": out_a,
        "predict": out_predict,
        "serve": out_serve,
    }.items():
        assert out.keys() == out_fit.keys(), name
        for attr, logits in out_fit.items():
            assert torch.equal(out[attr], logits), (name, attr)
    assert all(torch.equal(out_b[a], out_a[a]) for a in out_a)

    # the same decoded class everywhere: the post-fit prediction, the eval report's confusion matrix (its
    # one image), the ensemble's and agecls-predict's / agecls-serve's label
    (face_predicted,) = predicted["faces"]
    served_faces = served.json()["faces"]
    assert all(f.pop("thumbnail").startswith("data:image/jpeg;base64,") for f in served_faces)  # the page's
    assert served_faces == predicted["faces"]
    for attr, got in scored.items():
        names = module.class_names[attr]
        pred, label = int(got["preds"][0]), int(got["labels"][0])
        by_attr = report.get("attributes", {attr: report})[attr]
        assert by_attr["n_images"] == 1 and by_attr["confusion_matrix"][label][pred] == 1, attr
        ens = ensemble.get("attributes", {attr: ensemble})[attr]
        assert ens["confusion_matrix"][label][pred] == 1, attr
        assert face_predicted[attr]["label"] == names[pred], attr
        probs = [round(float(p), 6) for p in got["proba"][0]]
        assert list(face_predicted[attr]["probs"].values()) == probs, attr
    assert set(face_predicted) - {"face", "box", "detector", "aligned", "angle"} == set(scored)
