"""Faults survived, with real components: a real `mlflow server`, the training flow in its own process
and `bentoml serve`. A training killed with SIGKILL changes nothing in the registry; a full disk while
storing an upload is a 507 that stores nothing; with MLflow down the service keeps predicting, says
`degraded` and refuses model changes with a 503, and recovers when MLflow returns. Also: /health's
runtime and champion, unknown JSON fields, and edge results into the prediction log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from cellscan.core.images import encode_png
from tests.integration.conftest import REPO, make_project
from tests.integration.test_service import _free_port, _wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "fault-key-0123456789"
K = {"x-api-key": KEY}
BIN = Path(sys.executable).parent


def _mlflow(root: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=(root / "mlflow.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    _wait_http(f"http://127.0.0.1:{port}/health", proc, root / "mlflow.log")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _train(env: dict[str, str], project: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "flows.training", "--project", str(project)], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("faults")
    (root / "mlf").mkdir()
    mport = _free_port()
    mlflow = _mlflow(root / "mlf", mport)
    project = make_project(root / "proj", **{"retrain.epochs": 1})
    env = os.environ | {
        "CELLSCAN_HOME": str(project), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mport}",
        "PREFECT_HOME": str(root / "prefect"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    for k in ("CELLSCAN_MODEL_NAME", "CELLSCAN_API_KEY", "CELLSCAN_API_KEY_FILE", "CELLSCAN_OPEN", "CELLSCAN_RUNTIME"):
        env.pop(k, None)
    first = _train(env, project, root / "train1.log")
    assert first.wait(timeout=900) == 0, (root / "train1.log").read_text()[-3000:]
    port = _free_port()
    senv = env | {"CELLSCAN_API_KEY": KEY, "CELLSCAN_POLL_SECONDS": "1"}
    log = root / "serve.log"
    proc = subprocess.Popen([str(BIN / "bentoml"), "serve", "service.service:Cellscan", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=senv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    box = {"mlflow": mlflow}
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        yield {"base": f"http://127.0.0.1:{port}", "project": project, "root": root, "env": env, "mport": mport,
               "box": box, "log": log}
    finally:
        _stop(proc)
        _stop(box["mlflow"])


def _png(seed: int) -> bytes:
    return encode_png(np.random.default_rng(seed).random((48, 48)).astype(np.float32))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _registry(env: dict[str, str]) -> tuple[object, ...]:
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    versions = sorted((int(v.version), v.status) for v in mc.search_model_versions("name='cellscan'"))
    return tuple(versions), dict(mc.get_registered_model("cellscan").aliases)


def test_health_reports_runtime_and_champion(stack):
    h = httpx.get(f"{stack['base']}/health", timeout=30).json()
    assert h["status"] == "ok" and h["runtime"] == "keras"
    assert h["model_version"] == 1 and h["champion_version"] == 1
    assert h["mlflow"] == {"reachable": True, "error": None} and h["degraded"] == []


def test_unknown_json_fields_are_refused_by_name(stack):
    with httpx.Client(base_url=stack["base"], timeout=60) as c:
        r = c.post("/predict", json={"image_url": "http://example.com/a.png", "extra": 1, "heatmaps": True})
        assert r.status_code == 400 and r.json()["code"] == "bad_request", r.text
        assert "'extra'" in r.json()["error"] and "'heatmaps'" in r.json()["error"] and "image_url" in r.json()["error"]
        r = c.post("/rollback", json={"versoin": 1}, headers=K)
        assert r.status_code == 400 and "'versoin'" in r.json()["error"]
        # A bare URL as the JSON body is never fetched (BentoML would download it itself): a 400.
        r = c.post("/predict", content=b"http://127.0.0.1:1/a.png", headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()) == {"error", "code"}


def test_edge_results_reach_the_prediction_log(stack):
    from cellscan.edge import post_results
    from cellscan.errors import CellscanError
    from cellscan.mlops.monitor.predlog import PredictionLog
    from cellscan.settings import Settings

    rows = [{"image": f"/line/{i}.png", "model_version": 1, "status": "ok", "is_anomaly": i == 2,
             "anomaly_score": 0.1 * i, "reconstruction_error": 0.2, "threshold": 0.15} for i in range(3)]
    rows.append({"image": "/line/bad.png", "model_version": 1, "status": "error", "error": "ImageError: truncated"})
    info = {"source_version": 1, "format": "onnx"}
    log = PredictionLog.from_settings(Settings.from_env(stack["project"], {}))
    before = log.count()
    with pytest.raises(CellscanError, match="401"):  # keyed
        post_results(f"{stack['base']}/edge/results", rows, info, None)
    assert post_results(stack["base"], rows, info, KEY, chunk=2) == 2  # the default path, two requests
    df = log.frame()
    edge = df[df["source"] == "edge"]
    assert log.count() == before + 3 and len(edge) == 3
    assert edge["name"].tolist() == ["/line/0.png", "/line/1.png", "/line/2.png"]
    assert edge["is_anomaly"].tolist() == [0.0, 0.0, 1.0] and set(edge["model_version"]) == {1}
    r = httpx.post(f"{stack['base']}/edge/results", headers=K | {"content-type": "application/json"}, timeout=30,
                   content=b'{"records": [{"status": "ok", "is_anomaly": true, "anomaly_score": 1e999, "threshold": 1}]}')
    assert r.status_code == 400 and "records[0]" in r.json()["error"], r.text
    r = httpx.post(f"{stack['base']}/edge/results", headers=K, timeout=30, json={"records": rows[:1] * 1001})
    assert r.status_code == 400 and "at most 1000" in r.json()["error"]
    assert log.count() == before + 3


def test_training_killed_with_sigkill_changes_nothing(stack):
    """kill -9 of the training flow mid-way: the same versions and champion, the service unaffected, the
    training lock free, and the next training registers version 2."""
    env, project, root = stack["env"], stack["project"], stack["root"]
    before = _registry(env)
    log = root / "killed.log"
    proc = _train(env, project, log)
    deadline = time.monotonic() + 300
    # Prefect logs a task when it ends: the MLflow run opened means the train-model task has begun.
    while time.monotonic() < deadline and not re.search(r"open-mlflow-run-\w+' - Finished", log.read_text()):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(4)  # inside the training task (48 s on this machine)
    assert "train-model" not in log.read_text(), "training ended before the kill: not mid-way"
    group = [p for p in psutil.process_iter(["pid", "cmdline"]) if _pgid(p.pid) == proc.pid]
    assert any("uvicorn" in " ".join(p.info["cmdline"] or []) for p in group), "no temporary Prefect API to leave"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def left() -> list[object]:  # the flow's processes and its watchdog (which exits once it has cleaned up)
        procs = [p for p in group if p.pid != proc.pid and alive(p)]
        dogs = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and "cellscan.mlops.watchdog" in
                p.info["cmdline"] and str(proc.pid) in p.info["cmdline"]]
        return procs + dogs

    deadline = time.monotonic() + 45  # the watchdog marks the run crashed, then stops Prefect's temporary API
    while time.monotonic() < deadline and left():
        time.sleep(0.5)
    assert not left(), "processes outlived the killed flow"
    assert "registered cellscan version" not in log.read_text()
    states = _flow_run_states(env)
    assert states.count(("train-autoencoder", "CRASHED")) == 1 and not [s for s in states if s[1] == "RUNNING"]
    assert _registry(env) == before
    h = httpx.get(f"{stack['base']}/health", timeout=30).json()
    assert h["status"] == "ok" and h["model_version"] == 1
    r = httpx.post(f"{stack['base']}/predict", files={"image": ("a.png", _png(1), "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == 1
    again = _train(env, project, root / "train2.log")
    assert again.wait(timeout=900) == 0, (root / "train2.log").read_text()[-3000:]
    versions, aliases = _registry(env)
    assert [v for v, _ in versions] == [1, 2] and all(s == "READY" for _, s in versions)
    assert int(aliases["champion"]) in (1, 2)


def _flow_run_states(env: dict[str, str]) -> list[tuple[str, str]]:
    """(flow name, state type) of every flow run in the stack's Prefect database (through a fresh temporary API)."""
    code = ("from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    names = {f.id: f.name for f in c.read_flows()}\n"
            "    for r in c.read_flow_runs(): print(names[r.flow_id], r.state.type.value)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return [tuple(line.split()) for line in out.stdout.splitlines() if line.strip()]  # type: ignore[misc]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_full_disk_while_storing_is_a_507_and_loses_nothing(stack):
    project = stack["project"]
    temp = project / "data/cells/temp"
    temp.mkdir(parents=True, exist_ok=True)
    kept = _files(temp)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(temp)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): no real full disk to test with")
    try:
        for name, data in kept.items():
            (temp / name).write_bytes(data)
        with (temp / ".filler").open("wb", buffering=0) as f:  # fill it: every further write is ENOSPC
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        data_before = _files(project / "data/cells")
        with httpx.Client(base_url=stack["base"], timeout=120, headers=K) as c:
            r = c.post("/retrain", files={"image": ("new.png", _png(77), "image/png")}, data={"wait": "false"})
            assert r.status_code == 507, r.text
            assert r.json()["code"] == "storage_error" and "No space left" in r.json()["error"], r.text
            assert set(r.json()) == {"error", "code"}
            assert _files(project / "data/cells") == data_before  # no half-written file, nothing lost
            h = c.get("/health").json()
            assert h["status"] == "ok" and h["pending_jobs"] == 0  # no training queued for it
            assert c.post("/predict", files={"image": ("a.png", _png(78), "image/png")}).status_code == 200
    finally:
        subprocess.run(["umount", str(temp)], check=False)
    assert _files(temp) == kept


def test_mlflow_down_keeps_serving_and_recovers(stack):
    mport, box = stack["mport"], stack["box"]
    before = _files(stack["project"] / "data/cells")
    _stop(box["mlflow"])
    try:
        with httpx.Client(base_url=stack["base"], timeout=60, headers=K) as c:
            time.sleep(2.5)  # the probe's answer is kept 2 s
            h = c.get("/health")
            assert h.status_code == 200, h.text
            h = h.json()
            assert h["status"] == "degraded" and not h["mlflow"]["reachable"]
            assert "MLflow" in h["mlflow"]["error"] and str(mport) in h["mlflow"]["error"] and h["model_version"]
            t0 = time.perf_counter()
            r = c.post("/predict", files={"image": ("a.png", _png(5), "image/png")})
            assert r.status_code == 200 and r.json()["model_version"] == h["model_version"], r.text
            for method, route, kw in (("POST", "/rollback", {"json": {}}), ("GET", "/models", {}),
                                      ("POST", "/retrain", {"files": {"image": ("n.png", _png(6), "image/png")}}),
                                      ("POST", "/anomaly", {"files": {"image": ("n.png", _png(7), "image/png")},
                                                            "data": {"defect": "crack"}})):
                r = c.request(method, route, **kw)
                assert r.status_code == 503, (route, r.text)
                assert r.json()["code"] == "mlflow_unavailable" and "MLflow" in r.json()["error"], r.text
            page = c.get("/ui/models")  # the operators' page says why instead of waiting on retries
            assert page.status_code == 503 and 'id="mlflow-unavailable"' in page.text and str(mport) in page.text
            assert time.perf_counter() - t0 < 30  # no minutes of client retries
            assert _files(stack["project"] / "data/cells") == before  # nothing stored for a refused change
    finally:
        box["mlflow"] = _mlflow(stack["root"] / "mlf", mport)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(f"{stack['base']}/health", timeout=30).json()["status"] != "ok":
        time.sleep(1)
    h = httpx.get(f"{stack['base']}/health", timeout=30).json()
    assert h["status"] == "ok" and h["mlflow"]["reachable"]
    assert httpx.get(f"{stack['base']}/models", timeout=60).status_code == 200
    page = httpx.get(f"{stack['base']}/ui/models", timeout=60)
    assert page.status_code == 200 and "mlflow-unavailable" not in page.text and 'data-version="1"' in page.text
