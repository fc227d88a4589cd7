"""`make utkface` at a tiny budget: experiment=utkface trains a multitask model on real UTKFace photos,
agecls-register names it agecls-utkface@best, and agecls-serve's upload page shows all three attributes of
a real UTKFace photo in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import compose_train
from tests.data_helpers import REAL_SKIP_REASON, TINY_REAL, real_utkface_root

from agecls.data.bins import AgeBins
from agecls.data.faces.framing import UTKFACE
from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES

# in the default suite: a training run, a registration, a served model and a browser take about 35 s on 2
# shared CPU cores (minutes while a training run holds them)
pytestmark = [pytest.mark.slow, pytest.mark.real_data]
CHROMIUM = os.environ.get("AGECLS_CHROMIUM", "/usr/bin/chromium")
SUBSET_EVERY = 40  # 1 photo in 40 of the folder (about 470 of UTKFace's 18,964): seconds to scan and train
# the page's caption of one face holds "age: 26-45 (0.41)", "gender: male (0.77)", "ethnicity: white (0.52)"
ATTRIBUTE = r"{}: (\S+) \((\d\.\d\d)\)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(proc: subprocess.Popen, url: str, log: Path, seconds: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"agecls-serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/info", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"agecls-serve did not answer {url} within {seconds} s:\n{log.read_text()[-3000:]}")


def test_a_utkface_model_is_trained_registered_and_read_on_the_upload_page(output_dir, tmp_path, capsys):
    source = real_utkface_root()
    if source is None:
        pytest.skip(REAL_SKIP_REASON)
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')"
    )
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) or set AGECLS_CHROMIUM"
        )
    from agecls.cli import register
    from agecls.training.train import train

    subset = tmp_path / "UTKFace"
    subset.mkdir()
    photos = sorted(source.rglob("*.jpg"))[::SUBSET_EVERY]
    for photo in photos:
        shutil.copy(photo, subset / photo.name)

    cfg = compose_train(["experiment=utkface", f"data.root={subset}", *TINY_REAL])
    assert (cfg.task.name, cfg.tracking.experiment, cfg.data.name) == ("multitask", "utkface", "utkface")
    result = train(cfg)
    sizes = result["data_sizes"]
    assert sum(sizes.values()) == len(photos), sizes
    for attr in ("age", "gender", "ethnicity"):
        assert 0.0 <= result[f"best_val/{attr}/macro_f1"] <= 1.0
    # the checkpoint keeps the face framing fitted on its training images: UTKFace's own, within its spread
    kept = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)["hyper_parameters"][
        "framing"
    ]
    assert kept["mtcnn"]["found"] >= 22 and kept["mtcnn"]["tried"] == 24
    assert abs(kept["mtcnn"]["scale"] - UTKFACE["mtcnn"]["scale"]) < UTKFACE["mtcnn"]["scale_iqr"]

    uri = str(cfg.tracking.tracking_uri)
    assert register.main(["best_of=utkface", f"tracking_uri={uri}"]) == 0
    printed = capsys.readouterr().out
    assert f"as agecls-utkface@best: run {result['mlflow_run_id']}" in printed
    assert f"agecls-serve ckpt=models:/agecls-utkface@best tracking_uri={uri}" in printed

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # UTKFace's photos are face crops already, so the page predicts the whole photo (detect=false)
    serve = [sys.executable, "-m", "agecls.cli.serve", "ckpt=models:/agecls-utkface@best", "detect=false"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*serve, f"tracking_uri={uri}", f"port={port}"], stdout=out, stderr=subprocess.STDOUT
        )
    photo = subset / photos[0].name
    try:
        _wait_for_server(proc, url, log)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page(viewport={"width": 900, "height": 700})
                page.goto(url)
                page.set_input_files("#file", str(photo))
                page.click("#go")
                page.wait_for_selector("li.prediction", timeout=60_000)
                captions = page.locator("li.prediction").all_inner_texts()
                model_line = page.locator("#model").inner_text()
                warning_shown = page.locator("#warning").is_visible()
                page.screenshot(path=str(tmp_path / "utkface-page.png"), full_page=True)
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    assert (tmp_path / "utkface-page.png").stat().st_size > 0
    assert captions, "no prediction on the page"
    # the page names the model that answered, trained on real faces: no synthetic-data warning
    assert model_line.startswith("Model: models:/agecls-utkface@best (version 1)"), model_line
    assert f"MLflow run {result['mlflow_run_id']}" in model_line
    assert "predicts age, gender, ethnicity" in model_line
    assert "trained on utkface" in model_line and not warning_shown
    classes = {
        "age": AgeBins(list(cfg.bins.ranges)).labels,
        "gender": list(GENDER_NAMES),
        "ethnicity": list(ETHNICITY_NAMES),
    }
    for attr, names in classes.items():
        found = re.search(ATTRIBUTE.format(attr), captions[0])
        assert found, f"caption {captions[0]!r} has no '{attr}: CLASS (probability)'"
        assert found.group(1) in names, f"{attr}: {found.group(1)!r} is not one of {names}"
        assert 0.0 < float(found.group(2)) <= 1.0
