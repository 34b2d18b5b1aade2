"""Soak: the service under a mix of valid and hostile requests, and its worker's memory.

    .venv/bin/python benchmarks/soak.py                       # 10 minutes, 32 clients (the issue's figure)
    .venv/bin/python benchmarks/soak.py --seconds 60 --clients 16 --project /tmp/proj   # a trained project

Starts `bentoml serve` on 127.0.0.1 (with an API key) and a loopback image server, then:

1. soak: ``--clients`` clients for ``--seconds``; each request is valid (an upload or an allow-listed
   URL of a dataset image) or hostile (junk bytes, a decompression bomb, a PNG text bomb, a float
   TIFF with inf, a loopback URL, an oversized JSON body, a foreign Host, a text/plain body, an
   unknown field). Reports: errors on valid requests (must be 0), any 5xx (must be 0), p50/p99 of
   valid requests, and the worker's RSS at start and end;
2. peak: the worker's peak RSS above idle for one request carrying the largest image the limits
   allow (CELLSCAN_MAX_IMAGE_PIXELS, RGB), without and with a heatmap.

Writes benchmarks/results/soak.json (--out). ``--valid-share`` and ``--hostile`` narrow the mix, to find
which kind of request costs memory.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image, PngImagePlugin

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
KEY = "soak-key"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _project(root: Path, env: dict[str, str]) -> Path:
    from tests.integration.conftest import make_project

    project = make_project(root / "proj", **{"retrain.epochs": 1})
    subprocess.run([sys.executable, "-c", f"from flows.training import train_flow; train_flow(project={str(project)!r})"],
                   cwd=REPO, env=env | {"CELLSCAN_HOME": str(project),
                                        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow/mlflow.db"},
                   check=True, capture_output=True, timeout=900)
    return project


def _png(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _hostile() -> list[tuple[str, dict[str, object]]]:
    info = PngImagePlugin.PngInfo()
    info.add_text("k", "x" * (20 * 1024 * 1024), zip=True)
    tiff = io.BytesIO()
    a = np.ones((48, 48), np.float32)
    a[1, 1] = np.inf
    Image.fromarray(a, mode="F").save(tiff, format="TIFF")
    up = lambda data: {"files": {"image": ("x.png", data, "image/png")}}  # noqa: E731
    return [
        ("junk", up(b"not an image at all")),
        ("pixel-bomb", up(_png(np.zeros((6000, 6000), np.uint8)))),
        ("text-bomb", up(_png(np.zeros((8, 8), np.uint8), pnginfo=info))),
        ("float-inf", {"files": {"image": ("x.tif", tiff.getvalue(), "image/tiff")}}),
        ("loopback-url", {"json": {"image_url": "http://127.0.0.1:1/x.png"}}),
        ("big-json", {"content": b" " * (4 * 1024 * 1024), "headers": {"content-type": "application/json"}}),
        ("foreign-host", {"json": {}, "headers": {"host": "rebind.example"}}),
        ("text-plain", {"content": b"{}", "headers": {"content-type": "text/plain"}}),
        ("unknown-field", {"files": {"image": ("x.png", b"x", "image/png")}, "data": {"colour": "red"}}),
    ]


def _worker(pid: int) -> psutil.Process:
    """The serving worker: the descendant of `bentoml serve` holding the most memory."""
    procs = psutil.Process(pid).children(recursive=True)
    return max(procs, key=lambda p: p.memory_info().rss)


async def _soak(base: str, valid: list[dict[str, object]], hostile: list[tuple[str, dict[str, object]]],
                clients: int, seconds: float, valid_share: float = 0.5) -> dict[str, object]:
    lat: list[float] = []
    counts = {"valid": 0, "valid_errors": 0, "hostile": 0, "hostile_cut": 0, "5xx": 0}
    unexpected: list[str] = []
    stop = time.monotonic() + seconds
    rng = random.Random(0)

    async def client(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            if rng.random() < valid_share:
                kw = rng.choice(valid)
                t0 = time.perf_counter()
                r = await c.post("/predict", **kw)  # type: ignore[arg-type]
                counts["valid"] += 1
                if r.status_code != 200:
                    counts["valid_errors"] += 1
                    unexpected.append(f"valid: {r.status_code} {r.text[:200]}")
                else:
                    lat.append(time.perf_counter() - t0)
            else:
                name, kw = rng.choice(hostile)
                counts["hostile"] += 1
                try:
                    r = await c.post("/predict", **kw)  # type: ignore[arg-type]
                except httpx.TransportError:  # refused before the body was read whole (413), connection closed
                    counts["hostile_cut"] += 1
                    continue
                if not 400 <= r.status_code < 500:
                    unexpected.append(f"{name}: {r.status_code} {r.text[:200]}")
            if r.status_code >= 500:
                counts["5xx"] += 1

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    ms = sorted(x * 1000 for x in lat)
    return counts | {"p50_ms": ms[len(ms) // 2] if ms else None, "p99_ms": ms[int(len(ms) * 0.99)] if ms else None,
                     "unexpected": unexpected[:10]}


def _peak(base: str, worker: psutil.Process, side: int, heatmap: bool = False) -> dict[str, float]:
    """Peak RSS above idle while the worker decodes and scores the largest allowed image."""
    yy, xx = np.mgrid[0:side, 0:side]
    rgb = np.stack([(xx * 255 // side), (yy * 255 // side), ((xx + yy) * 127 // side)], -1).astype(np.uint8)
    data = _png(rgb)
    idle = worker.memory_info().rss
    peak, done = idle, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, worker.memory_info().rss)
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/predict", files={"image": ("big.png", data, "image/png")},
                   data={"heatmap": str(heatmap).lower()}, timeout=300)
    took = time.perf_counter() - t0
    done.set()
    t.join()
    return {"status": r.status_code, "pixels": side * side, "upload_mb": len(data) / 2**20, "seconds": took,
            "idle_mb": idle / 2**20, "peak_mb": peak / 2**20, "above_idle_mb": (peak - idle) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    ap.add_argument("--valid-share", type=float, default=0.5, help="share of valid requests (0: hostile only)")
    ap.add_argument("--hostile", default="", help="comma-separated kinds of hostile request to send (default: all)")
    ap.add_argument("--project", type=Path, help="a trained project (default: make and train a tiny one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cellscan-soak"))
    args = ap.parse_args()

    from cellscan.settings import OFFLINE_ENV, Settings

    env = os.environ | OFFLINE_ENV | {"PREFECT_HOME": str(args.work / "prefect"),
                                      "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for k in ("CELLSCAN_API_KEY_FILE", "CELLSCAN_OPEN", "CELLSCAN_MODEL_NAME"):
        env.pop(k, None)
    args.work.mkdir(parents=True, exist_ok=True)
    project = args.project.resolve() if args.project else _project(args.work, env)
    data = project / "data/cells"
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(data)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    fport = files.server_address[1]
    goods = sorted(data.glob("test/*/*.png"))[:20]
    valid: list[dict[str, object]] = [{"json": {"image_url": f"http://127.0.0.1:{fport}/{p.relative_to(data)}"}}
                                      for p in goods]
    valid += [{"files": {"image": (p.name, p.read_bytes(), "image/png")}} for p in goods]

    port = _port()
    senv = env | {"CELLSCAN_HOME": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow/mlflow.db",
                  "CELLSCAN_API_KEY": KEY, "CELLSCAN_URL_ALLOWLIST": f"127.0.0.1:{fport}"}
    max_pixels = Settings.from_env(project, senv).max_image_pixels
    log = (args.work / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=senv, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        worker = _worker(proc.pid)
        asyncio.run(_soak(base, valid, _hostile(), 4, 5))  # warm-up
        start_mb = worker.memory_info().rss / 2**20
        samples: list[tuple[int, float]] = []
        done = threading.Event()

        def sample() -> None:  # the worker's RSS every 30 s: a plateau (warm-up) and a steady climb (leak) differ
            t0 = time.monotonic()
            while not done.wait(30):
                samples.append((round(time.monotonic() - t0), round(worker.memory_info().rss / 2**20, 1)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        hostile = [h for h in _hostile() if not args.hostile or h[0] in args.hostile.split(",")]
        soak = asyncio.run(_soak(base, valid, hostile, args.clients, args.seconds, args.valid_share))
        done.set()
        sampler.join()
        end_mb = worker.memory_info().rss / 2**20
        peak = _peak(base, worker, int(max_pixels ** 0.5))
        peak_heatmap = _peak(base, worker, int(max_pixels ** 0.5), heatmap=True)
        result = {"clients": args.clients, "seconds": args.seconds, "cpus": os.cpu_count(),
                  "valid_share": args.valid_share, "hostile_kinds": [h[0] for h in hostile],
                  "soak": soak | {"worker_rss_start_mb": start_mb, "worker_rss_end_mb": end_mb,
                                  "growth_pct": 100 * (end_mb - start_mb) / start_mb,
                                  "worker_rss_mb_every_30s": samples},
                  "largest_image": peak, "largest_image_with_heatmap": peak_heatmap}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        files.shutdown()
    out = args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
