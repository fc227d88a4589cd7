"""agecls-serve under load: the real server (uvicorn in a subprocess on 127.0.0.1, a free port) gets 12
concurrent uploads at the pixel limits and stays up, answers each with JSON (200, or 503 with Retry-After)
and keeps its peak memory bounded. The client and the photos are bench/serve_load.py's (`make bench-serve`
runs the same at 50 requests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# 2 photos at work at once, each at most 16 Mpx decoded (48 MB as RGB) plus the detector's grey copies; before
# the work was bounded, 12 such uploads took the server from 0.9 GB to 5.9 GB
PEAK_ABOVE_READY_MB = 500


def test_concurrent_uploads_at_the_pixel_limits_keep_the_server_up_and_bounded(
    tiny_multitask_ckpt, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import serve_load

    rep = serve_load.run_load(tiny_multitask_ckpt, 12, 12, ["max_concurrent=2", "max_queue=4"], tmp_path)
    assert rep["ok"] + rep["busy"] == 12 and rep["other"] == [], rep
    assert rep["ok"] >= 6, rep  # the 2 at work and the 4 waiting are always answered
    assert rep["all_json"] and rep["busy_with_retry_after"] and rep["alive_after"], rep
    assert rep["faces_found"] == f"{rep['ok']}/{rep['ok']}", rep  # JPEGs decoded reduced still show the face
    assert rep["peak_mb"] - rep["rss_ready_mb"] < PEAK_ABOVE_READY_MB, rep
    # before uvicorn's own lines: which model it serves and where to open the page
    lines = (tmp_path / "server.log").read_text().splitlines()
    said = [line for line in lines if line.startswith("agecls-serve:")]
    assert said[0].startswith(f"agecls-serve: model {tiny_multitask_ckpt.resolve()} (MLflow run ")
    assert ": age, gender, ethnicity; trained on synthetic" in said[0]
    assert re.fullmatch(r"agecls-serve: open http://127\.0\.0\.1:\d+/ in a browser \(Ctrl-C stops\)", said[1])
