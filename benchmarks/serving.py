"""Serving benchmark: the cellscan BentoML service against the original design's Flask server.

Both load the same Keras model (the default architecture at 64x64, trained here on a synthetic
project that :func:`make_project` builds in a temporary folder) and answer the same requests
({"image_url": ...} pointing at a local file server) under 1, 8 and 32 concurrent clients.
Prints requests per second and p50/p99 latency per server and level, and the ratios.

    python benchmarks/serving.py [--seconds 15] [--out benchmarks/results/serving.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LEVELS = (1, 8, 32)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a: object) -> None:
        pass


def make_project(root: Path, overrides: dict[str, object]) -> Path:
    """A project to serve: params.yaml (the defaults plus ``overrides``), synthetic data, git + DVC."""
    from cellscan.core.config import Params
    from cellscan.mlops.versioning import init_project

    return init_project(root, Params().with_overrides(overrides))


def _wait(url: str, proc: subprocess.Popen[bytes], seconds: int = 180) -> None:
    for _ in range(seconds):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early ({url})")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready in {seconds} s")


async def _load(url: str, images: list[str], clients: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await c.post(url, json={"image_url": images[i % len(images)]})
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {"clients": clients, "requests": len(lat), "errors": errors, "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(a, 50)) if len(a) else float("nan"),
            "p99_ms": float(np.percentile(a, 99)) if len(a) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="load duration per level")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serving.json")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="cellscan-serving-"))
    project = make_project(tmp / "proj", {"data.image_size": 64, "train.epochs": 3, "synth.size": 128,
                                          "synth.n_train": 40, "synth.n_test_good": 20, "synth.n_per_defect": 5})
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"CELLSCAN_HOME": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow/mlflow.db",
                        "PREFECT_HOME": str(tmp / "prefect"), "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "2"}
    print("training the model to serve ...", flush=True)
    subprocess.run([sys.executable, "-c", f"from flows.training import train_flow; train_flow(project={str(project)!r})"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    model_dir = tmp / "model"
    subprocess.run([sys.executable, "-c",
                    "from cellscan.mlops import registry; from cellscan.settings import Settings; from pathlib import Path;"
                    f"m, _ = registry.load_model('champion', Settings.from_env(Path({str(project)!r}))); m.save({str(model_dir)!r})"],
                   cwd=REPO, env=env, check=True, capture_output=True)

    data = project / "data/cells"
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(data)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    fport = files.server_address[1]
    images = [f"http://127.0.0.1:{fport}/{p.relative_to(data)}" for p in sorted(data.rglob("test/*/*.png"))]

    results: dict[str, list[dict[str, float]]] = {}
    bport, fl_port = _port(), _port()
    servers = {
        "cellscan": ([str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan",
                      "--host", "127.0.0.1", "--port", str(bport)], f"http://127.0.0.1:{bport}",
                     env | {"CELLSCAN_URL_ALLOWLIST": f"127.0.0.1:{fport}", "CELLSCAN_OPEN": "1"}),
        "flask": ([sys.executable, str(HERE / "flask_baseline.py"), str(model_dir), str(fl_port)],
                  f"http://127.0.0.1:{fl_port}", env),
    }
    for name, (cmd, base, senv) in servers.items():
        proc = subprocess.Popen(cmd, cwd=REPO, env=senv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            _wait(f"{base}/readyz" if name == "cellscan" else f"{base}/predict", proc)
            asyncio.run(_load(f"{base}/predict", images, 4, 3.0))  # warm-up
            results[name] = []
            for level in LEVELS:
                r = asyncio.run(_load(f"{base}/predict", images, level, args.seconds))
                results[name].append(r)
                print(f"{name:9s} {level:3d} clients: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  ({r['requests']} ok, {r['errors']} errors)", flush=True)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    files.shutdown()

    print("\nclients  cellscan req/s  flask req/s  throughput x  cellscan p99 ms  flask p99 ms  p99 ratio")
    for c, f in zip(results["cellscan"], results["flask"], strict=True):
        print(f"{c['clients']:7d}  {c['rps']:14.1f}  {f['rps']:11.1f}  {c['rps'] / f['rps']:12.2f}  "
              f"{c['p99_ms']:15.1f}  {f['p99_ms']:12.1f}  {c['p99_ms'] / f['p99_ms']:9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
