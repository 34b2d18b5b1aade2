"""The BentoML service, started for real with `bentoml serve` on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from cellscan.core.images import encode_png
from tests.integration.conftest import REPO, make_project
from tests.integration.ports import free_port as _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "s3cret"


class _Files(SimpleHTTPRequestHandler):
    """Serves the project's files, plus /slow (answers after 10 s), /huge.png (64 Mpixel PNG) and
    /fresh/K/<path> (that image rolled by K+1 columns: pixels not yet in the dataset)."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/fresh/"):
            _, _, k, rel = self.path.split("/", 3)
            arr = np.asarray(Image.open(Path(self.directory) / rel))
            buf = io.BytesIO()
            Image.fromarray(np.roll(arr, int(k) + 1, axis=1)).save(buf, format="PNG")
            body = buf.getvalue()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/slow":
            time.sleep(10)
        if self.path == "/huge.png":
            buf = io.BytesIO()
            Image.new("L", (8000, 8000)).save(buf, format="PNG")
            body = buf.getvalue()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A trained project, an image server, and `bentoml serve` on it."""
    root = tmp_path_factory.mktemp("svc")
    project = make_project(root / "proj", **{"retrain.epochs": 1})
    env = os.environ | {
        "CELLSCAN_HOME": str(project),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow/mlflow.db",
        "PREFECT_HOME": str(root / "prefect"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("CELLSCAN_MODEL_NAME", None)
    # Train the first champion with the real flow, in its own process.
    subprocess.run([sys.executable, "-c", f"from flows.training import train_flow; train_flow(project={str(project)!r})"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    handler = lambda *a, **k: _Files(*a, directory=str(project / "data/cells"), **k)  # noqa: E731
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    fport = files.server_address[1]

    port = _free_port()
    env |= {"CELLSCAN_API_KEY": KEY, "CELLSCAN_URL_ALLOWLIST": f"127.0.0.1:{fport}", "CELLSCAN_FETCH_TIMEOUT": "2",
            "CELLSCAN_POLL_SECONDS": "1"}
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/readyz", proc, root / "serve.log")
        yield {"base": base, "files": f"http://127.0.0.1:{fport}", "project": project, "root": root, "pid": proc.pid,
               "env": env}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        files.shutdown()


def _client(served, key: str | None = KEY) -> httpx.Client:
    return httpx.Client(base_url=served["base"], timeout=300, headers={"x-api-key": key} if key else {})


def _image(served, name: str = "test/void") -> str:
    p = sorted((served["project"] / "data/cells" / name).glob("*.png"))[0]
    return f"{served['files']}/{p.relative_to(served['project'] / 'data/cells')}"


def _fresh(served, name: str, k: int) -> str:
    """A URL of a new image (a dataset image rolled): /retrain and /anomaly refuse copies of stored ones."""
    return _image(served, name).replace(served["files"], f"{served['files']}/fresh/{k}")


def test_health_models_and_metrics(served):
    with _client(served) as c:
        assert c.get("/health").json()["model_version"] == 1
        models = c.get("/models").json()
        assert models["serving"] == 1 and models["versions"][0]["aliases"] == ["champion"]
        assert c.get("/docs").status_code == 200


def test_predict_by_url_upload_batch_and_heatmap(served):
    with _client(served) as c:
        one = c.post("/predict", json={"image_url": _image(served)}).json()
        assert set(one) == {"is_anomaly", "anomaly_score", "reconstruction_error", "threshold", "model_version"}
        assert one["is_anomaly"] == (one["anomaly_score"] > one["threshold"])
        path = sorted((served["project"] / "data/cells/test/good").glob("*.png"))[0]
        up = c.post("/predict", files={"image": (path.name, path.read_bytes(), "image/png")}).json()
        assert up["model_version"] == 1 and isinstance(up["is_anomaly"], bool)
        batch = c.post("/predict", json={"image_urls": [_image(served), _image(served, "test/good")]}).json()
        assert isinstance(batch, list) and len(batch) == 2
        assert batch[0]["reconstruction_error"] == pytest.approx(one["reconstruction_error"], rel=1e-5)
        heat = c.post("/predict", json={"image_url": _image(served), "heatmap": True}).json()
        png = Image.open(io.BytesIO(base64.b64decode(heat["heatmap_png"])))
        assert png.mode == "RGB"
        # The heatmap has the size of the image sent, not the model's working size.
        wide = np.random.default_rng(3).random((40, 90)).astype(np.float32)
        sent = c.post("/predict", data={"heatmap": "true"},
                      files={"image": ("wide.png", encode_png(wide), "image/png")}).json()
        assert Image.open(io.BytesIO(base64.b64decode(sent["heatmap_png"]))).size == (90, 40)
        # The scan's page draws the same overlay again: concurrent requests, one model call at a time.
        scan = None
        for _ in range(40):  # the prediction log writes in a background thread
            rows = re.findall(r'data-scan="(\d+)">(.*?)</tr>', c.get("/ui/scans").text, re.S)
            scan = next((sid for sid, row in rows if "<td>wide.png</td>" in row), None)
            if scan:
                break
            time.sleep(0.25)
        assert scan, c.get("/ui/scans").text[:2000]
        with ThreadPoolExecutor(4) as pool:
            drawn = list(pool.map(lambda _: c.get(f"/ui/scans/{scan}/heatmap.png"), range(4)))
        assert [r.status_code for r in drawn] == [200] * 4
        assert {Image.open(io.BytesIO(r.content)).size for r in drawn} == {(90, 40)}
        metrics = c.get("/metrics").text
        assert "cellscan_predictions_total" in metrics and "cellscan_batch_size" in metrics


def _truncated_png() -> bytes:
    return encode_png(np.random.default_rng(0).random((64, 64)).astype(np.float32))[:150]


@pytest.mark.parametrize(
    ("kind", "payload", "status", "needle"),
    [
        ("upload", b"hello, not an image", 400, "not an image"),
        ("upload", "truncated", 400, "truncated"),
        ("json", {"image_url": "{files}/huge.png"}, 400, "expected at most"),
        ("json", {"image_url": "file:///etc/passwd"}, 400, "file:// URLs are disabled"),
        ("json", {"image_url": "http://127.0.0.1:1/x.png"}, 400, "non-public address 127.0.0.1"),
        ("json", {"image_url": "{files}/missing.png"}, 400, "did not answer 200"),
        ("json", {"image_url": "{files}/slow"}, 400, "took longer than 2 s"),
        ("json", {"image_url": "ftp://example.com/a.png"}, 400, "scheme 'ftp' is not allowed"),
        ("json", {}, 400, "send exactly one of image_url"),
        ("json", {"image_url": 5}, 400, "valid string"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(served, kind, payload, status, needle):
    with _client(served) as c:
        if kind == "upload":
            data = _truncated_png() if payload == "truncated" else payload
            r = c.post("/predict", files={"image": ("x.png", data, "image/png")})
        else:
            body = {k: v.format(files=served["files"]) if isinstance(v, str) else v for k, v in payload.items()}
            r = c.post("/predict", json=body)
        assert r.status_code == status, r.text
        assert needle in r.text
        assert c.post("/predict", json={"image_url": _image(served)}).status_code == 200


@pytest.mark.parametrize(("key", "status", "needle"), [(None, 401, "missing API key"), ("nope", 403, "wrong API key")])
def test_mutating_endpoints_need_the_api_key(served, key, status, needle):
    stored_before = sorted((served["project"] / "data").rglob("*.png"))
    with _client(served, key) as c:
        for route, body in (("/rollback", {}), ("/retrain", {"image_url": _image(served, "test/good")}),
                            ("/anomaly", {"image_url": _image(served)})):
            r = c.post(route, json=body)
            assert r.status_code == status and needle in r.text, (route, r.text)
    assert sorted((served["project"] / "data").rglob("*.png")) == stored_before


def _pngs(served) -> int:
    return len(list((served["project"] / "data").rglob("*.png")))


def _running_pid(c: httpx.Client, job_ids: list[str], seconds: float = 120) -> int:
    """Wait until one of the jobs runs and reports its process; its pid."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for job_id in job_ids:
            j = c.get(f"/jobs/{job_id}").json()
            if j["status"] == "running" and j["pid"]:
                return int(j["pid"])
            assert j["status"] in ("queued", "running"), j
        time.sleep(0.2)
    pytest.fail(f"jobs {job_ids} did not start in {seconds} s")


def _timed(fn, *args, **kwargs) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    return r, time.perf_counter() - t0


def test_retrain_jobs_anomaly_and_rollback(served):
    project = served["project"]
    with _client(served) as c:
        # Two concurrent retrain requests: both images are kept, the trainings run one after the other.
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(
                lambda u: c.post("/retrain", json={"image_url": u, "wait": False}).json(),
                [_fresh(served, "train/good", 0), _fresh(served, "test/good", 0)],
            ))
        ids = [a["job_id"] for a in answers]
        assert len(set(ids)) == 2
        for a in answers:
            assert (project / a["stored"][0]).exists() or (project / "data/cells/train/good").glob("new_*")

        # Past the limit (CELLSCAN_MAX_PENDING_JOBS, 2 by default): 429 with Retry-After, nothing stored.
        before = _pngs(served)
        r = c.post("/retrain", json={"image_url": _fresh(served, "test/good", 1), "wait": False})
        assert r.status_code == 429, r.text
        assert "limit 2" in r.json()["error"] and int(r.headers["retry-after"]) > 0
        assert _pngs(served) == before

        # The training runs in a child process of the service's worker, not in the worker itself.
        pid = _running_pid(c, ids)
        child = psutil.Process(pid)
        assert "flows.retrain" in child.cmdline()
        worker = child.parent()
        serve_tree = [psutil.Process(served["pid"]), *psutil.Process(served["pid"]).children(recursive=True)]
        assert worker.pid != pid and worker.pid in {p.pid for p in serve_tree}
        assert "flows.retrain" not in " ".join(worker.cmdline())

        # While it trains, predictions, rollback and the operations routes answer at once.
        r, dt = _timed(c.post, "/predict", json={"image_url": _image(served)})
        assert r.status_code == 200 and dt < 5, (r.status_code, dt)
        r, dt = _timed(c.post, "/rollback", json={"version": 999})
        assert r.status_code == 404 and dt < 5, (r.status_code, dt)
        r, dt = _timed(c.get, "/health")
        assert r.json()["pending_jobs"] >= 1 and dt < 5, (r.text, dt)

        results = []
        for job_id in ids:
            for _ in range(300):
                j = c.get(f"/jobs/{job_id}").json()
                if j["status"] in ("done", "failed"):
                    break
                # Predictions keep being answered while training runs.
                assert c.post("/predict", json={"image_url": _image(served)}).status_code == 200
                time.sleep(1)
            assert j["status"] == "done", j
            assert j["pid"] and j["pid"] != worker.pid
            results.append(j["result"])
        assert {"new_validation_error", "new_anomaly_error", "version", "promoted", "reason"} <= set(results[0])
        assert len(list((project / "data/cells/train/good").glob("new_*"))) == 2
        assert sorted(r["version"] for r in results) == [2, 3]
        assert c.get("/jobs/nope").status_code == 404
        # The service follows the champion as soon as a job ends.
        assert c.get("/health").json()["model_version"] == c.get("/models").json()["serving"]

        # A known anomaly (waiting for the job): errors and threshold re-evaluated into a new version.
        r = c.post("/anomaly", json={"image_url": _fresh(served, "test/crack", 0), "defect": "crack"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert {"new_validation_error", "new_anomaly_error", "threshold", "version", "promoted", "reason"} <= set(body)
        assert body["status"] == "done" and c.get(f"/jobs/{body['job_id']}").json()["kind"] == "anomaly"
        newest = body["version"]

        # Rollback: the alias moves and the service follows.
        champion = c.get("/models").json()["serving"]
        r = c.post("/rollback", json={})
        assert r.status_code == 200, r.text
        back = r.json()["champion"]
        assert back != champion and r.json()["serving"] == back
        assert c.post("/predict", json={"image_url": _image(served)}).json()["model_version"] == back
        assert c.post("/rollback", json={"version": 999}).status_code == 404
        assert newest >= 4


def test_failed_retrain_keeps_the_champion_serving(served):
    with _client(served) as c:
        before = c.get("/health").json()["model_version"]
        # Not an image: refused before anything is stored or trained.
        r = c.post("/retrain", files={"image": ("bad.png", b"garbage", "image/png")})
        assert r.status_code == 400 and "not an image" in r.text
        assert c.get("/health").json()["model_version"] == before
        assert c.post("/predict", json={"image_url": _image(served)}).status_code == 200

        # A training process that dies: the job fails with a clear error, the champion keeps serving.
        r = c.post("/retrain", json={"image_url": _fresh(served, "test/good", 2), "wait": False})
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        os.killpg(_running_pid(c, [job_id]), 9)
        for _ in range(60):
            j = c.get(f"/jobs/{job_id}").json()
            if j["status"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert j["status"] == "failed" and "killed by SIGKILL" in j["error"], j
        assert c.get("/health").json()["pending_jobs"] == 0
        assert c.get("/health").json()["model_version"] == before
        assert c.post("/predict", json={"image_url": _image(served)}).json()["model_version"] == before


def test_onnx_runtime_service_gives_the_keras_services_verdicts(served):
    """CELLSCAN_RUNTIME=onnx: the export is made on demand (with maps.onnx), and under concurrent load
    (two batches at once) every verdict and score equals the TensorFlow service's."""
    port = _free_port()
    log_path = served["root"] / "serve-onnx.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=served["env"] | {"CELLSCAN_RUNTIME": "onnx"}, stdout=log_path.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/readyz", proc, log_path, seconds=300)
        with _client(served) as tf, httpx.Client(base_url=base, timeout=300) as ox:
            health = ox.get("/health").json()
            assert health["runtime"] == "onnx" and health["model_version"] == tf.get("/health").json()["model_version"]
            version = health["model_version"]
            assert (served["project"] / "exports" / f"v{version}-onnx" / "maps.onnx").is_file()
            names = [n for n in ("test/good", "test/void", "test/crack", "test/particle") if
                     (served["project"] / "data/cells" / n).is_dir()]
            urls = [f"{served['files']}/{p.relative_to(served['project'] / 'data/cells')}"
                    for n in names for p in sorted((served["project"] / "data/cells" / n).glob("*.png"))[:6]]
            with ThreadPoolExecutor(8) as pool:  # concurrent: batches form and both ONNX workers score
                got = list(pool.map(lambda u: ox.post("/predict", json={"image_url": u}).json(), urls))
            want = [tf.post("/predict", json={"image_url": u}).json() for u in urls]
        assert len(urls) >= 12 and all(g["model_version"] == version for g in got)
        assert [g["is_anomaly"] for g in got] == [w["is_anomaly"] for w in want]
        assert max(abs(g["anomaly_score"] - w["anomaly_score"]) for g, w in zip(got, want, strict=True)) < 1e-3
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _prefect(env: dict[str, str], *args: str, log=subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(Path(sys.executable).parent / "prefect"), *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: int = 120) -> None:
    for _ in range(seconds):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited: {log.read_text()[-2000:]}")
        time.sleep(1)
    pytest.fail(f"{url} not ready in {seconds} s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for _ in range(2):  # a Prefect worker forwards the first signal and stops on the second
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue
    os.killpg(proc.pid, 9)
    proc.wait(timeout=15)


@pytest.fixture(scope="module")
def prefect_served(served):  # type: ignore[no-untyped-def]
    """A real Prefect server, the deployments, a process worker, and a second service using them."""
    root = served["root"]
    env = served["env"] | {"PREFECT_HOME": str(root / "prefect-server")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        api_port, port = _free_port(), _free_port()
        log = root / "prefect-server.log"
        procs.append(_prefect(env, "server", "start", "--host", "127.0.0.1", "--port", str(api_port),
                              log=log.open("w")))
        _wait_http(f"http://127.0.0.1:{api_port}/api/health", procs[-1], log)
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{api_port}/api"
        subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool", "create", "cellscan-test",
                        "--type", "process"], cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", "cellscan-test", "--project",
                        str(served["project"])], cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
        procs.append(_prefect(env, "worker", "start", "--pool", "cellscan-test",
                              log=(root / "prefect-worker.log").open("w")))
        log = root / "serve-prefect.log"
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_http(f"http://127.0.0.1:{port}/readyz", procs[-1], log)
        yield served | {"base": f"http://127.0.0.1:{port}", "api": env["PREFECT_API_URL"]}
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_with_a_prefect_server_jobs_are_runs_of_its_deployments(prefect_served):
    crack = sorted((prefect_served["project"] / "data/cells/test/crack").glob("*.png"))[0]
    with _client(prefect_served) as c:
        new = np.roll(np.asarray(Image.open(crack)), 3, axis=0)  # not yet in the dataset (copies get 409)
        r = c.post("/anomaly", files={"image": (crack.name, encode_png(new / 255.0), "image/png")},
                   data={"defect": "crack"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert {"new_validation_error", "new_anomaly_error", "threshold", "version", "promoted", "reason"} <= set(body)
        job = c.get(f"/jobs/{body['job_id']}").json()
        assert job["status"] == "done" and job["pid"] is None and job["flow_run_id"] == body["flow_run_id"]
        assert job["flow_run_state"] == "Completed"
        assert c.get("/health").json()["model_version"] == c.get("/models").json()["serving"]
    # The run belongs to the deployment the worker executed, on the Prefect server.
    api = prefect_served["api"]
    run = httpx.get(f"{api}/flow_runs/{body['flow_run_id']}", timeout=10).json()
    assert run["state_type"] == "COMPLETED" and run["parameters"]["project"] == str(prefect_served["project"])
    dep = httpx.get(f"{api}/deployments/{run['deployment_id']}", timeout=10).json()
    assert dep["name"] == "service-evaluate-threshold"
