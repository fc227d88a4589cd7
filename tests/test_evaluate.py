"""`agecls-eval`: a trained checkpoint scored on every labelled image of a fresh folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.cli.eval import VALID_KEYS, main, parse_args
from agecls.config import CONFIG_DIR
from agecls.data.synthetic import generate_synthetic
from agecls.evaluation.evaluate import UsageError, evaluate
from agecls.training.train import train
from data_helpers import jpeg_bytes

pytestmark = pytest.mark.slow

N_FRESH = 80
KEYS = {
    "checkpoint",
    "folder",
    "folder_fingerprint",
    "task",
    "class_names",
    "n_images",
    "n_rejected",
    "tta",
    "n_unlabelled",
    "macro_f1",
    "acc",
    "per_class",
    "confusion_matrix",
    "rejected",
    "image_size",
    "grayscale",
    "bins",
    "mlflow_run_id",
    "seconds",
}


@pytest.fixture(scope="module")
def trained(output_dir) -> dict:
    """One FAST training run (age, 7 bins) on the default synthetic faces."""
    return train(compose_train([*FAST_OVERRIDES, "trainer.max_epochs=1", "tracking.experiment=eval-src"]))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """Faces the model never saw (another generator seed), plus two files the scan must reject."""
    folder = generate_synthetic(tmp_path_factory.mktemp("fresh") / "faces", N_FRESH, seed=11)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "face.jpg").write_bytes(jpeg_bytes(3))
    return folder


def test_evaluate_scores_every_labelled_image_writes_json_and_records_it(
    trained, fresh, output_dir, tmp_path
):
    out = tmp_path / "reports" / "eval.json"
    cfg = parse_args(
        [f"ckpt={trained['checkpoint']}", f"data.root={fresh}", f"eval.out={out}", "eval.batch_size=16"]
    )
    result = evaluate(cfg)

    assert set(result) == KEYS
    assert result["class_names"] == trained["class_names"] and result["task"] == "age"
    assert result["n_images"] == N_FRESH and result["n_unlabelled"] == 0
    assert result["n_rejected"] == 2
    assert {r["path"] for r in result["rejected"]} == {"notes.txt", "face.jpg"}
    n = len(result["class_names"])
    confusion = result["confusion_matrix"]
    assert len(confusion) == n and all(len(row) == n for row in confusion)
    assert sum(map(sum, confusion)) == N_FRESH
    assert [r["class"] for r in result["per_class"]] == result["class_names"]
    assert sum(r["support"] for r in result["per_class"]) == N_FRESH
    assert [r["support"] for r in result["per_class"]] == [sum(row) for row in confusion]
    assert 0.0 <= result["macro_f1"] <= 1.0
    assert result["acc"] == pytest.approx(sum(confusion[i][i] for i in range(n)) / N_FRESH)
    assert result["image_size"] == 32 and result["grayscale"] is True
    assert result["checkpoint"] == str(Path(trained["checkpoint"]).resolve())
    assert json.loads(out.read_text()) == result
    assert not [p for p in out.parent.iterdir() if p.name != "eval.json"], "no temp file left behind"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    run = client.get_run(result["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "eval-src-eval"
    assert run.info.status == "FINISHED"
    assert run.data.params["ckpt"] == result["checkpoint"] and run.data.params["folder"] == result["folder"]
    assert run.data.metrics["eval/macro_f1"] == pytest.approx(result["macro_f1"])
    assert run.data.metrics["eval/n_images"] == N_FRESH and run.data.metrics["eval/n_rejected"] == 2
    assert run.data.tags["train_run_id"] == trained["mlflow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/eval.json", "evaluation/confusion_eval.png"} <= artifacts


def test_console_script_prints_the_same_json(trained, fresh, output_dir, tmp_path):
    script = Path(sys.executable).parent / "agecls-eval"
    done = subprocess.run(
        [str(script), f"ckpt={trained['checkpoint']}", f"data.root={fresh}", "tracking.enabled=false"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AGECLS_OUTPUT_DIR": str(output_dir)},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout holds the JSON report and nothing else
    assert result["mlflow_run_id"] is None
    assert result["n_images"] == N_FRESH and sum(map(sum, result["confusion_matrix"])) == N_FRESH
    again = evaluate(
        parse_args([f"ckpt={trained['checkpoint']}", f"data.root={fresh}", "tracking.enabled=false"])
    )
    same = ("macro_f1", "acc", "confusion_matrix", "per_class")
    assert {k: result[k] for k in same} == {k: again[k] for k in same}  # deterministic, cache reused


def test_bad_arguments_exit_2_naming_the_problem(tmp_path, capsys):
    ckpt, gone = tmp_path / "best.ckpt", tmp_path / "gone"
    cases = [
        ([f"data.root={tmp_path}"], "ckpt=... is required"),
        ([f"ckpt={tmp_path / 'nope.ckpt'}", f"data.root={tmp_path}"], "nope.ckpt: no such checkpoint file"),
        ([f"ckpt={ckpt}", f"data.root={gone}"], f"data.root={gone}: no such folder"),
        (
            [f"ckpt={ckpt}", "eval.bacth_size=3"],
            "unknown key 'eval.bacth_size'; did you mean eval.batch_size?",
        ),
        (
            [f"ckpt={ckpt}", "data.root=x", "eval.batch_size=0"],
            "eval.batch_size=0: valid: a whole number >= 1",
        ),
        ([f"ckpt={ckpt}", "data.root=x", "tracking.enabled=maybe"], "tracking.enabled='maybe'"),
        (["--out", "x"], "unexpected argument '--out'"),
        ([f"ckpt={ckpt}", "data.root=a,b"], "one value per key"),
        ([], "ckpt=PATH data.root=DIR"),
    ]
    ckpt.write_bytes(b"")
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("agecls-eval: score a checkpoint")
    assert (CONFIG_DIR / "eval.yaml").read_text() in text
    assert len(VALID_KEYS) == 17 and all(f"{key.rsplit('.', 1)[-1]}: " in text for key in VALID_KEYS)
    with pytest.raises(UsageError):
        parse_args(["+eval.extra=1"])


def test_a_file_that_is_not_a_checkpoint_exits_1(tmp_path, capsys):
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    assert main([f"ckpt={ckpt}", f"data.root={tmp_path}", "tracking.enabled=false"]) == 1
    assert f"ckpt={ckpt}: not a loadable agecls checkpoint" in capsys.readouterr().err


def test_dataset_normalisation_is_recomputed_from_the_training_split(trained, tmp_path):
    from omegaconf import OmegaConf

    from agecls.evaluation.scoring import EvalError, normalize_stats

    cfg = compose_train([*FAST_OVERRIDES, "data.normalize=dataset"])  # the data `trained` used
    run_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # as a checkpoint holds it
    mean, std = normalize_stats(run_cfg, None, None)
    assert mean.shape == std.shape == (1,) and 0 < float(mean[0]) < 1 and 0 < float(std[0]) < 1
    run_cfg.data.root, run_cfg.data.synthetic = str(tmp_path / "moved"), None
    with pytest.raises(EvalError, match="data.normalize=dataset.*cannot be read again"):
        normalize_stats(run_cfg, None, None)


def test_a_missing_local_tracking_store_is_named_before_any_work(tmp_path):
    from omegaconf import OmegaConf

    from agecls.evaluation.record import check_store
    from agecls.evaluation.scoring import EvalError

    gone = f"sqlite:///{tmp_path}/moved/mlflow.db"
    with pytest.raises(EvalError, match=r"store .*moved/mlflow\.db is not there.*tracking\.enabled=false"):
        check_store(OmegaConf.create({"enabled": True, "tracking_uri": gone}))
    check_store(OmegaConf.create({"enabled": False, "tracking_uri": gone}))
    check_store(OmegaConf.create({"enabled": True, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))


def test_dataset_statistics_travel_in_the_checkpoint_and_outlive_the_training_data(output_dir, tmp_path):
    """data.normalize=dataset: the checkpoint keeps the mean/std the datamodule resolved, so agecls-eval and
    agecls-predict give the same answers once the training run's manifest and image cache are deleted."""
    import shutil

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from agecls.data.cache import decode_image
    from agecls.data.prepare import prepare_data
    from agecls.evaluation.scoring import EvalError, normalize_stats
    from agecls.serving.predict import attribute_probs, load_model
    from agecls.training.train import build_datamodule

    own = tmp_path / "training-data"  # this run's own faces, manifest and cache: the shared ones stay put
    folder = generate_synthetic(own / "faces", 120, seed=3)  # a plain folder: nothing regenerates it
    cfg = compose_train(
        [
            *[o for o in FAST_OVERRIDES if not o.startswith("data.synthetic")],
            "data=utkface",
            f"data.root={folder}",
            "trainer.max_epochs=1",
            "data.normalize=dataset",
            "data.grayscale=false",  # three channels, three means
            f"paths.data_dir={own}/data",
            f"paths.cache_dir={own}/cache",
            "tracking.enabled=false",
        ]
    )
    ckpt = train(cfg)["checkpoint"]
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["input_stats"]
    datamodule, _ = build_datamodule(cfg, prepare_data(cfg.data, cfg.paths))
    assert stored == {"mean": datamodule.mean.tolist(), "std": datamodule.std.tolist()}
    assert len(stored["mean"]) == 3 and all(0 < v < 1 for v in stored["mean"] + stored["std"])
    run_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    recomputed = normalize_stats(run_cfg, None, None)  # what a checkpoint without input_stats gets
    assert recomputed[0].tolist() == stored["mean"] and recomputed[1].tolist() == stored["std"]

    fresh = generate_synthetic(tmp_path / "fresh", 24, seed=5)
    argv = [f"ckpt={ckpt}", f"data.root={fresh}", "tracking.enabled=false", f"paths.cache_dir={tmp_path}/ev"]
    faces = sorted(fresh.glob("*.jpg"))[:6]

    def predicted() -> tuple[dict, dict]:
        model = load_model(Path(ckpt))
        assert model.mean.flatten().tolist() == stored["mean"]
        assert model.std.flatten().tolist() == stored["std"]
        x = model.tensor([decode_image(f, model.size, False) for f in faces])
        probs = attribute_probs(model.module, x)
        return evaluate(parse_args(argv)), probs

    before, probs_before = predicted()
    shutil.rmtree(own)
    with pytest.raises(EvalError, match="cannot be read again"):  # the old recompute has nothing to read
        normalize_stats(run_cfg, None, None)
    after, probs_after = predicted()
    same = ("n_images", "macro_f1", "acc", "confusion_matrix", "per_class")
    assert before["n_images"] == 24 and {k: after[k] for k in same} == {k: before[k] for k in same}
    assert probs_after.keys() == probs_before.keys() == {"age"}
    assert torch.equal(probs_after["age"], probs_before["age"])
    assert not np.isnan(probs_after["age"].numpy()).any()
