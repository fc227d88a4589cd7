"""agecls-serve under load: concurrent uploads of photos at the pixel limits; memory and latency.

Starts the real server (agecls-serve in a subprocess on 127.0.0.1, a free port; nothing leaves the machine)
with a tiny multitask checkpoint (trained here on synthetic faces, 1 epoch; detection dominates the time,
not the weights) unless --ckpt is given, waits until it answers, sends one warm-up photo, then --requests
uploads from --concurrency client threads at once. The photos alternate: a PNG just under
max_decoded_pixels (3990x4000, 16.0 Mpx) and a JPEG just under max_pixels (7300x5470, 39.9 Mpx), both a flat
colour with matplotlib's grace_hopper.jpg (512x600, one face) pasted in, so they are small on disk (well
under max_upload_mb) and the detector has a face to find. Memory is the server process's VmRSS when ready,
its VmHWM (peak) after the load, and its VmRSS 2 s after the last answer (/proc/PID/status).

    .venv/bin/python bench/serve_load.py                                   # print the section
    .venv/bin/python bench/serve_load.py --notes bench/results/serve-load-notes.md \\
        --write docs/BENCHMARKS-SERVING.md
    .venv/bin/python bench/serve_load.py --from-json bench/results/serve_load.json \\
        --notes bench/results/serve-load-notes.md --write docs/BENCHMARKS-SERVING.md
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_pipeline import machine  # bench/ is on sys.path when a script in it runs
from sections import machine_text, provenance, read_notes, render_saved, write_section

BEGIN, END = "<!-- serve_load:begin -->", "<!-- serve_load:end -->"
PNG_SIZE, JPEG_SIZE = (3990, 4000), (7300, 5470)  # just under the defaults of max_decoded_pixels, max_pixels
FACE_AT = (1000, 1200)  # where the face's top-left corner is pasted (photo pixels)


def photo(size: tuple[int, int], fmt: str) -> bytes:
    """A flat-colour photo of `size` with grace_hopper.jpg pasted at FACE_AT, encoded as `fmt`."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        face = Image.open(fh).convert("RGB")
    scale = max(1, round(max(size) / 3600))  # the face stays ~1/7 of the photo: large enough to be found
    if scale > 1:
        face = face.resize((face.width * scale, face.height * scale), Image.Resampling.BICUBIC)
    img = Image.new("RGB", size, (128, 110, 95))
    img.paste(face, FACE_AT)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def tiny_checkpoint(out: Path) -> Path:
    """A multitask checkpoint trained for 1 epoch on 200 synthetic 32 px faces, under `out`."""
    os.environ["AGECLS_OUTPUT_DIR"] = str(out)
    from hydra import compose, initialize_config_dir

    from agecls.config import CONFIG_DIR, register_resolvers
    from agecls.training.train import train

    overrides = [
        "data.synthetic.n=200",
        "data.image_size=32",
        "model.blocks=2",
        "model.base_channels=8",
        "model.hidden=32",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "task=multitask",
    ]
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return Path(train(cfg)["checkpoint"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int, key: str) -> float:
    """VmRSS / VmHWM of process `pid` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def post(port: int, name: str, data: bytes, timeout: float = 600) -> dict:
    """POST one photo to /api/predict: {status, seconds, retry_after, body (parsed JSON or None)}."""
    boundary = uuid.uuid4().hex
    ctype = "image/png" if name.endswith(".png") else "image/jpeg"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        conn.request("POST", "/api/predict", body, headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    return {
        "status": resp.status,
        "seconds": time.perf_counter() - start,
        "retry_after": resp.getheader("retry-after"),
        "json": resp.getheader("content-type", "").startswith("application/json") and parsed is not None,
        "body": parsed,
    }


def start_server(ckpt: Path, settings: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    """agecls-serve started in a subprocess on 127.0.0.1 and a free port (wait_ready: until it answers)."""
    port = free_port()
    exe = Path(sys.executable).with_name("agecls-serve")
    cmd = [str(exe), f"ckpt={ckpt}", "host=127.0.0.1", f"port={port}", *settings]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT), port


def wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Return once the server's /api/info answers 200; RuntimeError if it exits or takes over 120 s."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agecls-serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/info")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"agecls-serve did not answer within 120 s: {log.read_text()[-2000:]}")


def run_load(ckpt: Path, requests: int, concurrency: int, settings: list[str], workdir: Path) -> dict:
    """Start the server, warm it up, send the load; the measurements."""
    proc, port = start_server(ckpt, settings, workdir / "server.log")
    try:
        uploads = [("big.png", photo(PNG_SIZE, "PNG")), ("big.jpg", photo(JPEG_SIZE, "JPEG"))]  # as it starts
        wait_ready(proc, port, workdir / "server.log")
        warm = post(port, "warm.jpg", photo((640, 720), "JPEG"))
        assert warm["status"] == 200, warm
        ready = memory_mb(proc.pid, "VmRSS")
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(post, port, *uploads[i % 2]) for i in range(requests)]
            results = [f.result() for f in futures]
        wall = time.perf_counter() - start
        peak = memory_mb(proc.pid, "VmHWM")
        time.sleep(2)
        after = memory_mb(proc.pid, "VmRSS")
        alive = proc.poll() is None and post(port, "warm.jpg", photo((640, 720), "JPEG"))["status"] == 200
    finally:
        proc.terminate()
        proc.wait(30)
    ok = [r for r in results if r["status"] == 200]
    busy = [r for r in results if r["status"] == 503]
    faces = [len(r["body"]["faces"]) for r in ok]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "settings": settings,
        "sizes": {name: len(data) for name, data in uploads},
        "ok": len(ok),
        "busy": len(busy),
        "other": sorted({r["status"] for r in results} - {200, 503}),
        "all_json": all(r["json"] for r in results),
        "busy_with_retry_after": all(r["retry_after"] for r in busy),
        "faces_found": f"{sum(f == 1 for f in faces)}/{len(faces)}",
        "alive_after": alive,
        "rss_ready_mb": round(ready),
        "peak_mb": round(peak),
        "rss_after_mb": round(after),
        "wall_s": round(wall, 1),
        "ok_s": quantiles([r["seconds"] for r in ok]),
        "busy_s": quantiles([r["seconds"] for r in busy]),
    }


def quantiles(values: list[float]) -> dict[str, float] | None:
    """p50, p95 and max of `values` in seconds (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 2), "p95": round(p95, 2), "max": round(ordered[-1], 2)}


def render(rep: dict) -> str:
    """The BENCHMARKS.md section of a run_load report (+ machine, date, notes)."""

    def lat(q: dict | None) -> str:
        return "-" if q is None else f"{q['p50']} / {q['p95']} / {q['max']}"

    def yes(flag: bool) -> str:
        return "yes" if flag else "NO"

    settings = " ".join(rep["settings"]) or "the defaults (max_concurrent=2 max_queue=16 max_wait_s=60)"
    kb = rep.get("sizes_kb") or {name: round(size / 1024) for name, size in rep["sizes"].items()}
    lines = [
        BEGIN,
        "## agecls-serve under load: concurrent uploads at the pixel limits",
        "",
        *provenance(rep["command"], rep["machine"], rep["date"]),
        f"- Setup: the real server (uvicorn, 127.0.0.1) with {settings} and a tiny multitask checkpoint; "
        f"{rep['requests']} POST /api/predict from {rep['concurrency']} client threads at once, alternating "
        f"a 3990x4000 PNG (16.0 Mpx, {kb['big.png']} KB) and a 7300x5470 JPEG (39.9 Mpx, "
        f"{kb['big.jpg']} KB), flat colour with one face pasted in. Memory: the server's VmRSS after a "
        "warm-up photo, its VmHWM after the load, its VmRSS 2 s later.",
        "",
        "| requests | concurrency | 200 | 503 | other | RSS ready (MB) | peak VmHWM (MB) | RSS after (MB) "
        "| 200: p50 / p95 / max (s) | 503: p50 / p95 / max (s) | wall (s) | face found | all JSON / 503 with "
        "Retry-After / alive after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|",
        f"| {rep['requests']} | {rep['concurrency']} | {rep['ok']} | {rep['busy']} | {len(rep['other'])} "
        f"| {rep['rss_ready_mb']} | {rep['peak_mb']} | {rep['rss_after_mb']} | {lat(rep['ok_s'])} "
        f"| {lat(rep['busy_s'])} | {rep['wall_s']} | {rep['faces_found']} | {yes(rep['all_json'])} / "
        f"{yes(rep['busy_with_retry_after'])} / {yes(rep['alive_after'])} |",
    ]
    if rep.get("notes"):
        lines += ["", *rep["notes"]]
    return "\n".join([*lines, END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--ckpt", type=Path, help="a checkpoint to serve (default: train a tiny one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="agecls-serve settings")
    parser.add_argument("--json", type=Path, help="also save the measurements here")
    parser.add_argument("--notes", type=Path, help="Markdown lines to append to the section")
    parser.add_argument("--write", type=Path, help="rewrite this benchmark's section of this file")
    parser.add_argument("--from-json", type=Path, help="render a saved bench/results/serve_load.json instead")
    args = parser.parse_args(argv)
    if args.from_json:
        return render_saved(args.from_json, render, args.write, (BEGIN, END), args.notes)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="agecls-serve-load-") as tmp:
        ckpt = args.ckpt or tiny_checkpoint(Path(tmp) / "outputs")
        rep = run_load(ckpt, args.requests, args.concurrency, list(args.set), Path(tmp))
    threads = os.environ.get("OMP_NUM_THREADS")
    rep["machine"] = (
        f"{machine_text(machine())}; 1-min load {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        f"the end{f'; OMP_NUM_THREADS={threads} in the server' if threads else ''}"
    )
    rep["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rep["command"] = "make bench-serve"
    saved = json.dumps(rep, indent=2) + "\n"
    if args.json:
        args.json.write_text(saved)
    if args.write:  # the committed record of the section, for --from-json
        (Path(__file__).parent / "results" / "serve_load.json").write_text(saved)
    if args.notes:
        rep["notes"] = read_notes(args.notes, args.write)
    section = render(rep)
    print(section)
    if args.write:
        write_section(args.write, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
