"""A registered agecls model is an MLflow Model: `mlflow.pyfunc.load_model` predicts with it, `mlflow models
serve` answers, and agecls-predict still takes the same `models:/...` reference."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agecls.serving.mlflow_model import example_image, register_run_model, save_pyfunc
from agecls.serving.predict import Predictor, load_model
from agecls.serving.sources import resolve_checkpoint

pytestmark = pytest.mark.slow
ATTRS = ("age", "gender", "ethnicity")


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [example_image(), _jpeg(1), b"not an image"]


@pytest.fixture(scope="module")
def registered(tiny_multitask_ckpt, output_dir) -> str:
    run_id = json.loads((Path(tiny_multitask_ckpt).parent.parent / "results.json").read_text())[
        "mlflow_run_id"
    ]
    uri = f"sqlite:///{output_dir}/mlflow.db"
    assert register_run_model(uri, run_id, "agecls-pyfunc-test", detect=False) == "1"
    return uri


def test_the_saved_model_predicts_per_face_like_agecls_predict(tiny_multitask_ckpt, tmp_path, images):
    import mlflow.pyfunc

    path = save_pyfunc(Path(tiny_multitask_ckpt), tmp_path / "model", detect=False)
    model = mlflow.pyfunc.load_model(str(path))
    assert model.metadata.get_input_schema().input_names() == ["image"]
    out = model.predict(pd.DataFrame({"image": images}))
    assert list(out["image"]) == [0, 1, 2]
    assert list(out["status"]) == ["ok", "ok", "error"]
    assert "cannot" in out.loc[2, "error"] or "not" in out.loc[2, "error"]
    direct = Predictor([load_model(Path(tiny_multitask_ckpt))], detect=False)
    for i in (0, 1):
        want = direct.predict_file(images[i])["faces"][0]
        for attr in ATTRS:
            assert out.loc[i, attr] == want[attr]["label"]
            assert out.loc[i, f"{attr}_prob"] == pytest.approx(want[attr]["prob"], abs=1e-6)
    assert set(out.loc[0, "age"].split()) and 0 < out.loc[0, "age_prob"] <= 1


def test_the_registry_alias_loads_in_mlflow_and_in_agecls_predict(
    registered, images, tiny_multitask_ckpt, tmp_path
):
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(registered)
    model = mlflow.pyfunc.load_model("models:/agecls-pyfunc-test@best")
    out = model.predict(pd.DataFrame({"image": images[:2]}))
    assert list(out["status"]) == ["ok", "ok"] and set(ATTRS) <= set(out.columns)
    ckpt = resolve_checkpoint("models:/agecls-pyfunc-test@best", registered, tmp_path / "dl")
    assert (
        ckpt.name == Path(tiny_multitask_ckpt).name
        and ckpt.read_bytes() == Path(tiny_multitask_ckpt).read_bytes()
    )
    run_id = json.loads((Path(tiny_multitask_ckpt).parent.parent / "results.json").read_text())[
        "mlflow_run_id"
    ]
    assert register_run_model(registered, run_id, "agecls-pyfunc-test", detect=False) == "1"  # no new version


def test_mlflow_models_serve_answers(registered, images):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    # mlflow starts `uvicorn` by name: the venv's bin folder must be on PATH (an activated venv)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered, "PATH": f"{mlflow.parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(mlflow), "models", "serve", "-m", "models:/agecls-pyfunc-test@best", "--env-manager", "local"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(images[0]).decode()]]}}
        ).encode()
        deadline, answer = time.time() + 120, None
        while time.time() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, server.stdout.read().decode()[-3000:] if server.poll() is not None else ""
        (row,) = answer["predictions"]
        assert row["status"] == "ok" and {f"{a}_prob" for a in ATTRS} <= set(row)
    finally:
        server.terminate()
        server.wait(30)


def test_agecls_register_picks_the_best_finished_run_of_an_experiment(registered, capsys):
    import mlflow

    from agecls.cli import register

    argv = ["best_of=predict-src", "name=agecls-cli-test", f"tracking_uri={registered}", "detect=false"]
    assert register.main(argv) == 0
    printed = capsys.readouterr().out
    client = mlflow.MlflowClient(tracking_uri=registered)
    version = client.get_model_version_by_alias("agecls-cli-test", "best")
    runs = client.search_runs(
        [client.get_experiment_by_name("predict-src").experiment_id], "attributes.status = 'FINISHED'"
    )
    best = max(runs, key=lambda r: r.data.metrics.get("best_val/macro_f1", -1))
    assert version.run_id == best.info.run_id
    assert printed.startswith(
        f"registered agecls-cli-test version 1 as agecls-cli-test@best: run {best.info.run_id}"
    )
    assert "agecls-predict ckpt=models:/agecls-cli-test@best" in printed

    assert register.main(["run=0123456789abcdef", f"tracking_uri={registered}"]) == 1
    assert "run=0123456789abcdef: no such MLflow run" in capsys.readouterr().err
    assert register.main([f"tracking_uri={registered}"]) == 2


@pytest.fixture(scope="module")
def second_member(tiny_multitask_ckpt, tmp_path_factory) -> Path:
    """The tiny multitask checkpoint with its weights moved a little: another seed of the same model, so
    the two disagree on probabilities but share their classes."""
    import torch

    state = torch.load(tiny_multitask_ckpt, map_location="cpu", weights_only=False)
    gen = torch.Generator().manual_seed(0)
    for key, value in state["state_dict"].items():
        if value.is_floating_point():
            state["state_dict"][key] = value + 0.3 * torch.randn(value.shape, generator=gen)
    path = tmp_path_factory.mktemp("member") / "checkpoints" / "best.ckpt"
    path.parent.mkdir()
    torch.save(state, path)
    return path


def _probs(predictor: Predictor, image: bytes) -> dict[str, dict[str, float]]:
    face = predictor.predict_file(image)["faces"][0]
    return {attr: face[attr]["probs"] for attr in ATTRS}


def test_checkpoints_of_one_attribute_are_an_ensemble_of_mean_probabilities(
    tiny_multitask_ckpt, second_member, images, tmp_path
):
    import mlflow.pyfunc

    one, two = load_model(Path(tiny_multitask_ckpt)), load_model(second_member)
    a, b = (_probs(Predictor([m], detect=False), images[1]) for m in (one, two))
    assert a["age"] != b["age"]
    both = Predictor([one, two], detect=False)
    got = _probs(both, images[1])
    for attr in ATTRS:
        for name, p in got[attr].items():
            assert p == pytest.approx((a[attr][name] + b[attr][name]) / 2, abs=2e-6)
        assert both.predict_file(images[1])["faces"][0][attr]["label"] == max(got[attr], key=got[attr].get)
    # the same ensemble as an MLflow Model answers the same
    path = save_pyfunc([Path(tiny_multitask_ckpt), second_member], tmp_path / "model", detect=False)
    assert sorted(p.name for p in (path / "artifacts").glob("*.ckpt")) == ["member-0.ckpt", "member-1.ckpt"]
    out = mlflow.pyfunc.load_model(str(path)).predict(pd.DataFrame({"image": images[1:2]}))
    for attr in ATTRS:
        want = both.predict_file(images[1])["faces"][0][attr]
        assert out.loc[0, attr] == want["label"] and out.loc[0, f"{attr}_prob"] == pytest.approx(want["prob"])


def test_members_with_other_classes_are_refused_naming_both(tiny_multitask_ckpt):
    from dataclasses import replace

    from agecls.errors import UsageError

    one = load_model(Path(tiny_multitask_ckpt))
    other = replace(one, path=Path("other.ckpt"), class_names={"gender": ["f", "m"]})
    with pytest.raises(
        UsageError, match=r"^ckpt: other.ckpt predicts gender as \['f', 'm'\], .* share their"
    ):
        Predictor([one, other], detect=False)


def test_a_registered_ensemble_resolves_to_all_its_members(
    registered, tiny_multitask_ckpt, second_member, tmp_path
):
    from mlflow import MlflowClient

    from agecls.errors import UsageError
    from agecls.serving.mlflow_model import register_ensemble_model
    from agecls.serving.sources import resolve_model, resolve_models

    client = MlflowClient(tracking_uri=registered)
    first = json.loads((Path(tiny_multitask_ckpt).parent.parent / "results.json").read_text())[
        "mlflow_run_id"
    ]
    experiment = client.create_experiment("ensemble-members")
    second = client.create_run(experiment).info.run_id
    client.log_artifact(second, str(second_member), "checkpoints")
    study = client.create_run(experiment).info.run_id
    version = register_ensemble_model(registered, [first, second], "agecls-ens", "best", record_run=study)
    again = register_ensemble_model(registered, [first, second], "agecls-ens", "best", record_run=study)
    assert version == again == "1"
    found = resolve_models("models:/agecls-ens@best", registered, tmp_path / "dl")
    assert [p.name for p, _ in found] == ["member-0.ckpt", "member-1.ckpt"]
    assert found[1][0].read_bytes() == second_member.read_bytes()
    assert found[0][1].registered == "agecls-ens" and found[0][1].run_id == study
    with pytest.raises(UsageError, match="an ensemble of 2 checkpoints, not one"):
        resolve_model("models:/agecls-ens@best", registered, tmp_path / "dl2")
