"""Serving benchmark: the cellscan BentoML service (TensorFlow or ONNX Runtime) and the original Flask server.

All load the same Keras model (the default architecture at the defaults' native size, 128x128 on
the synthetic CT slices; ``--image-size`` for another; trained here on a synthetic project that
:func:`make_project` builds in a temporary folder) and answer the same requests
({"image_url": ...} pointing at a local file server) under 1, 8 and 32 concurrent clients:

- ``cellscan``: the service as it ships (networks in TensorFlow/Keras);
- ``cellscan-onnx``: the same service with ``CELLSCAN_RUNTIME=onnx`` (the champion's ONNX export, made
  on demand at start-up, in onnxruntime; the pixel maps in the export's maps graph, the image scores
  in the same numpy as Keras');
- ``flask``: the original design's server.

Prints requests per second and p50/p99 latency per server and level, and the ratios against
``cellscan``. Then the bare model in this process, without HTTP: images per second at batch 1 and
32 for the networks alone (``forward``) and with the scoring (``score_arrays``), Keras against
ONNX Runtime, so the service's overhead over the model is visible.

    python benchmarks/serving.py [--seconds 30] [--rounds 3] [--servers cellscan,cellscan-onnx,flask] [--image-size 0]
                                 [--out benchmarks/results/serving.json]
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
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LEVELS = (1, 8, 32)
SERVERS = ("cellscan", "cellscan-onnx", "flask")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


async def _load(url: str, images: list[str], clients: int, seconds: float) -> dict[str, Any]:
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
    return {"clients": clients, "errors": errors, "wall_s": wall, "latencies_s": lat}


def _pooled(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput and latency percentiles over the rounds of one server at one level."""
    lat = [v for r in runs for v in r["latencies_s"]]
    a = np.array(lat) * 1000
    return {"clients": runs[0]["clients"], "requests": len(lat), "errors": sum(r["errors"] for r in runs),
            "rounds": len(runs), "rps": len(lat) / sum(r["wall_s"] for r in runs),
            "p50_ms": float(np.percentile(a, 50)) if len(a) else float("nan"),
            "p99_ms": float(np.percentile(a, 99)) if len(a) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="load duration per server and level")
    ap.add_argument("--rounds", type=int, default=3, help="turns the servers take at each level (seconds split)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serving.json")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of: {', '.join(SERVERS)}")
    ap.add_argument("--model-seconds", type=float, default=3.0, help="duration of each bare-model measurement")
    ap.add_argument("--image-size", type=int, default=0, help="working size of the model (0: native, the default)")
    ap.add_argument("--project", type=Path, help="reuse the project (proj/) of an earlier run instead of training")
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := set(wanted) - set(SERVERS):
        ap.error(f"unknown servers {sorted(unknown)}; must be among: {', '.join(SERVERS)}")

    tmp = args.project.resolve().parent if args.project else Path(tempfile.mkdtemp(prefix="cellscan-serving-"))
    project = args.project.resolve() if args.project else make_project(
        tmp / "proj", {"data.image_size": args.image_size, "train.epochs": 3, "synth.size": 128, "synth.n_train": 40,
                       "synth.n_test_good": 20, "synth.n_per_defect": 5})
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"CELLSCAN_HOME": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow/mlflow.db",
                        "PREFECT_HOME": str(tmp / "prefect"), "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "2",
                        "CELLSCAN_API_KEY": "benchmark"}  # the service refuses to start without one
    print(f"training the model to serve in {project} ...", flush=True)
    if not args.project:
        subprocess.run([sys.executable, "-c", f"from flows.training import train_flow; train_flow(project={str(project)!r})"],
                       cwd=REPO, env=env, check=True, capture_output=True)
    model_dir = tmp / "model"
    subprocess.run([sys.executable, "-c",
                    "from cellscan.mlops import registry; from cellscan.settings import Settings; from pathlib import Path;"
                    f"m, _ = registry.load_model('champion', Settings.from_env(Path({str(project)!r}))); m.save({str(model_dir)!r})"],
                   cwd=REPO, env=env, check=True, capture_output=True)

    data = project / "data/cells"
    # The image server runs in its own process, as it would on another machine: in this process its
    # threads took the GIL from the load generator and capped every server near the same rate.
    fport = _port()
    files = subprocess.Popen([sys.executable, "-m", "http.server", str(fport), "--bind", "127.0.0.1",
                              "--directory", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(f"http://127.0.0.1:{fport}/", files, 30)
    images = [f"http://127.0.0.1:{fport}/{p.relative_to(data)}" for p in sorted(data.rglob("test/*/*.png"))]

    results: dict[str, list[dict[str, float]]] = {}
    bport, oport, fl_port = _port(), _port(), _port()
    bento = [str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan", "--host", "127.0.0.1"]
    allow = {"CELLSCAN_URL_ALLOWLIST": f"127.0.0.1:{fport}", "CELLSCAN_OPEN": "1"}  # /predict only, loopback
    servers = {
        "cellscan": ([*bento, "--port", str(bport)], f"http://127.0.0.1:{bport}", env | allow),
        "cellscan-onnx": ([*bento, "--port", str(oport)], f"http://127.0.0.1:{oport}",
                          env | allow | {"CELLSCAN_RUNTIME": "onnx"}),
        "flask": ([sys.executable, str(HERE / "flask_baseline.py"), str(model_dir), str(fl_port)],
                  f"http://127.0.0.1:{fl_port}", env),
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in wanted:
            cmd, base, senv = servers[name]
            log = (tmp / f"{name}.log").open("wb")
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=senv, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            _wait(f"{base}/readyz" if name.startswith("cellscan") else f"{base}/predict", procs[name])
            asyncio.run(_load(f"{base}/predict", images, 4, 3.0))  # warm-up
        # All servers stay up and take turns, ``--rounds`` times per level: a slow minute of this shared
        # machine then falls on every server instead of on one (runs of one server after the other
        # differed by 20 % from one run to the next).
        for name in wanted:
            results[name] = []
        for level in LEVELS:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in wanted}
            for _ in range(args.rounds):
                for name in wanted:
                    runs[name].append(asyncio.run(_load(f"{servers[name][1]}/predict", images, level,
                                                        args.seconds / args.rounds)))
            for name in wanted:
                r = _pooled(runs[name])
                results[name].append(r)
                print(f"{name:9s} {level:3d} clients: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  ({r['requests']} ok, {r['errors']} errors)", flush=True)
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    files.terminate()
    files.wait(timeout=10)

    bare = bare_model(model_dir, project, args.model_seconds) if "cellscan-onnx" in wanted else {}
    table = markdown(results, bare, args.seconds, args.rounds)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results | ({"bare_model": bare} if bare else {}), indent=2))
    args.out.with_suffix(".md").write_text(table)
    return 0


def _rate(fn: object, x: np.ndarray, seconds: float) -> float:
    """Images per second of ``fn(x)`` over about ``seconds`` (after one warm-up call)."""
    fn(x)  # type: ignore[operator]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)  # type: ignore[operator]
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def bare_model(model_dir: Path, project: Path, seconds: float) -> dict[str, dict[str, float]]:
    """Images/s of the networks alone (forward) and with the scoring (score_arrays), Keras vs ONNX Runtime."""
    from cellscan.core.bundle import CellscanModel
    from cellscan.edge import load_export

    keras_model = CellscanModel.load_dir(model_dir)
    exported = sorted((project / "exports").glob("v*-onnx"))
    models = {"keras": keras_model, "onnx": load_export(exported[-1])}
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for name, m in models.items():
        for batch in (1, 32):
            x = rng.random((batch, *m.shape, m.channels)).astype(np.float32)
            out[f"{name} batch {batch}"] = {"forward_images_per_s": _rate(m.forward, x, seconds),
                                            "score_images_per_s": _rate(m.score_arrays, x, seconds)}
    return out


def markdown(results: dict[str, list[dict[str, float]]], bare: dict[str, dict[str, float]], seconds: float,
             rounds: int = 1) -> str:
    """The results as Markdown tables: per server and level, the ratios against ``cellscan``, the bare model."""
    lines = [f"Serving ({seconds:g} s per server and level, in {rounds} turns; requests are {{\"image_url\"}} to a "
             "local file server)", "",
             "| server | clients | req/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        lines += [f"| {name} | {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                  f"{r['errors']} |" for r in rows]
    if "cellscan" in results:
        for name in (n for n in results if n != "cellscan"):
            lines += ["", f"| clients | {name} / cellscan throughput | p99 ratio |", "|---:|---:|---:|"]
            for c, o in zip(results["cellscan"], results[name], strict=True):
                lines.append(f"| {c['clients']} | {o['rps'] / c['rps']:.2f}x | {o['p99_ms'] / c['p99_ms']:.2f} |")
    if bare:
        lines += ["", "Bare model in one process (no HTTP), images/s", "",
                  "| runtime | batch | networks (forward) | networks + scoring (maps graph in ONNX) |", "|---|---:|---:|---:|"]
        for key, r in bare.items():
            rt, _, b = key.partition(" batch ")
            lines.append(f"| {rt} | {b} | {r['forward_images_per_s']:.1f} | {r['score_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
