"""The /ui pages over HTTP (no browser, no model): they render from the prediction log, and verdicts need the key."""

from __future__ import annotations

import asyncio
import socket
import time
import types

import numpy as np
import pytest
from starlette.testclient import TestClient

from cellscan.core.images import encode_png
from cellscan.mlops.monitor.predlog import Item, PredictionLog
from cellscan.serve.apidoc import operations
from cellscan.serve.pages import mlflow_run_url

KEY = "k3y"


class _Holder:
    version = 1

    def current(self):  # type: ignore[no-untyped-def]
        raise AssertionError("no model in these tests")


@pytest.fixture
def ui(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CELLSCAN_HOME", str(tmp_path))
    monkeypatch.setenv("CELLSCAN_API_KEY", KEY)
    for var in ("CELLSCAN_MONITOR_DIR", "CELLSCAN_PREDICTION_DB", "CELLSCAN_API_KEY_FILE", "CELLSCAN_OPEN"):
        monkeypatch.delenv(var, raising=False)
    from service import service

    service.settings.cache_clear()
    s = service.settings()
    log = PredictionLog.from_settings(s)
    x = np.full((8, 8, 1), 0.5, np.float32)
    recs = [{"anomaly_score": sc, "reconstruction_error": 0.0, "threshold": 1.0, "is_anomaly": sc > 1}
            for sc in (0.5, 2.0)]
    log.write([Item(x * (i + 1) / 2, encode_png(x[..., 0] * (i + 1) / 2), r, None, "upload", f"s{i}.png", 1, 0.01)
               for i, r in enumerate(recs)])
    from cellscan.serve.health import TrackingProbe

    fake = types.SimpleNamespace(settings=s, holder=_Holder(), plog=None, project=tmp_path, _intake=asyncio.Lock(),
                                 probe=TrackingProbe(s.tracking_uri))
    service._SERVICES[:] = [fake]
    yield TestClient(service.Guard(service.ops))
    service._SERVICES[:] = []
    service.settings.cache_clear()


def test_scans_render_newest_first_and_filter(ui):
    page = ui.get("/ui/scans")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.index("s1.png") < page.text.index("s0.png")  # newest first
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    flagged = ui.get("/ui/scans", params={"verdict": "anomaly"}).text
    assert "s1.png" in flagged and "s0.png" not in flagged
    assert ui.get("/ui/scans/2").status_code == 200 and "unreviewed" in ui.get("/ui/scans/2").text
    thumb = ui.get("/ui/scans/2/image.png", params={"size": 4})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert ui.get("/ui/scans/99").json()["code"] == "not_found"
    for path in ("/ui/scans/99999999999999999999", "/ui/scans/99999999999999999999/image.png",
                 "/ui/scans/99999999999999999999/heatmap.png", "/ui/static/" + "a" * 300):
        assert ui.get(path).json()["code"] == "not_found", path  # not an overflow or OS error (a 500)
    # FastAPI's 422 for a parameter of the wrong type: the documented 400
    wrong_types = (("/ui/scans", {"limit": "abc"}), ("/ui/scans/abc", {}),
                   ("/monitoring/batches", {"days": "x"}))
    for path, params in wrong_types:
        wrong = ui.get(path, params=params)
        assert wrong.status_code == 400, (path, wrong.text)
        assert wrong.json()["code"] == "bad_request"
    for path in ("/ui/upload", "/ui/monitoring", "/ui/static/ui.js", "/ui/static/ui.css"):
        assert ui.get(path).status_code == 200, path


def test_verdicts_need_the_key_and_are_given_once(ui):
    url = "/ui/scans/2/verdict"
    missing = ui.post(url, json={"verdict": "confirmed"})
    assert (missing.status_code, missing.json()["code"]) == (401, "missing_api_key")
    wrong = ui.post(url, json={"verdict": "confirmed"}, headers={"X-API-Key": "nope"})
    assert (wrong.status_code, wrong.json()["code"]) == (403, "wrong_api_key")
    cross = ui.post(url, json={"verdict": "confirmed"}, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and set(cross.json()) == {"error", "code"}
    assert ui.post(url, json={"verdict": "missed_defect"}, headers={"X-API-Key": KEY}).status_code == 400
    deep = b'{"verdict": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    nested = ui.post(url, content=deep, headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    assert nested.status_code == 400
    assert "verdict" in nested.json()["error"]
    ok = ui.post(url, json={"verdict": "confirmed"}, headers={"X-API-Key": KEY}).json()
    assert ok["verdict"] == "confirmed" and ok["by"].startswith("key-") and KEY not in ok["by"]
    again = ui.post(url, json={"verdict": "confirmed"}, headers={"X-API-Key": KEY})
    assert (again.status_code, again.json()["code"]) == (409, "conflict")
    assert "s1.png" in ui.get("/ui/scans", params={"review": "confirmed"}).text
    assert "s1.png" not in ui.get("/ui/scans", params={"review": "unreviewed"}).text
    rollback = ui.post("/rollback", json={"version": 1})
    assert rollback.status_code == 401


def test_api_page_lists_every_route_offline(ui):
    page = ui.get("/ui/api")
    assert page.status_code == 200
    for route in ("/predict", "/retrain", "/anomaly", "/rollback", "/health", "/ui/scans/{scan_id}/verdict"):
        assert f"{route}</code>" in page.text, route
    assert '"error"' in page.text and "cdn" not in page.text.lower()
    assert ui.get("/docs").text == page.text  # /docs is the same page (FastAPI's CDN Swagger is off)


def test_operations_build_examples():
    spec = {"paths": {"/predict": {"post": {"summary": "Score", "requestBody": {"content": {"application/json": {
        "schema": {"properties": {"image_url": {"type": "string"}, "heatmap": {"type": "boolean", "default": False}}}}}},
        "responses": {"200": {"description": "ok"}}}}}}
    (op,) = operations(spec)
    assert op["method"] == "POST" and [f["name"] for f in op["fields"]] == ["image_url", "heatmap"]
    assert '"heatmap": false' in op["curl"] and op["answers"] == [("200", "ok")]


def test_curl_examples_send_the_key_from_the_shell(tmp_path):
    import json
    import shlex
    import subprocess

    spec = {"paths": {"/rollback": {"post": {"requestBody": {"content": {"application/json": {
        "schema": {"properties": {"version": {"type": "integer"}}}}}}}},
        "/edge/results": {"post": {"summary": "Edge results"}}}}
    ops = {op["path"]: op for op in operations(spec)}
    for path in ("/rollback", "/edge/results"):  # each word as bash passes it to curl, with KEY set
        shown = ops[path]["curl"].replace("curl ", "printf '%s\\n' ", 1)
        words = subprocess.run(["bash", "-c", shown], env={"KEY": "k3y"}, capture_output=True, text=True,
                               check=True).stdout.splitlines()
        assert "X-API-Key: k3y" in words, ops[path]["curl"]
    words = shlex.split(ops["/edge/results"]["curl"])
    assert "Content-Type: application/json" in words
    body = json.loads(words[words.index("-d") + 1])
    from cellscan.serve.edgelog import edge_rows

    assert len(edge_rows(body)[0]) == 1  # the example is a body the endpoint takes


@pytest.mark.parametrize(("uri", "url"), [
    ("http://127.0.0.1:5000/", "http://127.0.0.1:5000/#/experiments/7/runs/r1"),  # the MLflow server: its UI
    ("sqlite:///proj/mlflow/mlflow.db", None),  # a local store has no UI to link to
    ("https://ops:s3cret@mlflow.lan/", "https://mlflow.lan/#/experiments/7/runs/r1"),  # no password in a link
])
def test_mlflow_run_links(uri, url):
    assert mlflow_run_url(uri, "7", "r1") == url


def test_models_page_lists_versions_with_rollback(ui, monkeypatch):
    from cellscan.mlops import registry

    rows = [{"version": v, "aliases": ["champion"] if v == 2 else [], "kind": "train", "threshold": 1.5,
             "image_auroc": 0.9, "f1": 0.8, "data_hash": "h", "gate": "promoted: better f1", "run_id": f"r{v}",
             "run_name": f"run-{v}", "created": 0} for v in (2, 1)]
    monkeypatch.setattr(registry, "list_versions", lambda settings: rows)
    page = ui.get("/ui/models").text
    assert 'id="rollback-1"' in page and 'id="rollback-2"' not in page and "promoted: better f1" in page


def test_models_page_with_mlflow_unreachable_is_an_html_503_that_says_why(ui):
    from cellscan.serve.health import TrackingProbe
    from service import service

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service._SERVICES[0].probe = TrackingProbe(f"http://127.0.0.1:{port}")
    r = ui.get("/ui/models")
    assert r.status_code == 503 and r.headers["content-type"].startswith("text/html")  # the guard leaves it HTML
    assert 'id="mlflow-unavailable"' in r.text and str(port) in r.text and 'data-version=' not in r.text
    assert ui.get("/nope-api-route").headers["content-type"].startswith("application/json")  # the API: JSON errors


def test_a_double_clicked_false_alarm_is_one_verdict_and_one_stored_image(ui, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from service import service

    from cellscan.serve.intake import DatasetIndex

    root = tmp_path / "data"
    (root / "training").mkdir(parents=True)
    (root / "training" / "n0.png").write_bytes(encode_png(np.zeros((8, 8), np.float32)))
    index = DatasetIndex(root, 10**8)
    find = index.find

    def slow_find(digest: str) -> object:  # a wide window between the check and the store
        time.sleep(0.3)
        return find(digest)

    index.find = slow_find  # type: ignore[method-assign]
    service._SERVICES[0].index = index

    def send(_: int) -> object:
        return ui.post("/ui/scans/2/verdict", json={"verdict": "false_alarm"}, headers={"X-API-Key": KEY})

    with ui, ThreadPoolExecutor(2) as pool:  # one event loop for both requests, as in the service
        answers = list(pool.map(send, range(2)))
    assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
    assert len(list((root / "temp").glob("*.png"))) == 1


# "..": not a file name; 100 CJK characters from a URL: 304 bytes, over the file system's 255
@pytest.mark.parametrize("name", ["..", "\u6f22" * 100 + ".png"], ids=["dot-dot", "cjk-304-bytes"])
def test_a_missed_defect_is_stored_under_a_usable_file_name(ui, name):
    from service import service

    seen = []

    async def store_and_run(kind, role, image_url, path, wait):  # type: ignore[no-untyped-def]
        seen.append((path.name, path.is_file()))
        return {"stored": ["data/anomaly/x.png"], "job_id": "j1"}

    fake = service._SERVICES[0]
    fake._store_and_run = store_and_run
    x = np.full((8, 8, 1), 0.25, np.float32)
    rec = {"anomaly_score": 0.1, "reconstruction_error": 0.0, "threshold": 1.0, "is_anomaly": False}
    fake_log = PredictionLog.from_settings(fake.settings)
    fake_log.write([Item(x, encode_png(x[..., 0]), rec, None, "upload", name, 1, 0.01)])
    r = ui.post("/ui/scans/3/verdict", json={"verdict": "missed_defect"}, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    assert seen == [("scan.png", True)]


def test_the_models_page_shows_no_tracking_password(ui):
    import dataclasses

    from service import service

    from cellscan.serve.health import TrackingProbe

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fake = service._SERVICES[0]
    fake.settings = dataclasses.replace(fake.settings, tracking_uri=f"http://ops:s3cret@127.0.0.1:{port}")
    fake.probe = TrackingProbe(fake.settings.tracking_uri)
    r = ui.get("/ui/models")
    assert r.status_code == 503, r.text
    assert f"127.0.0.1:{port}" in r.text
    assert "s3cret" not in r.text


def test_a_heatmap_that_needs_another_version_says_why_it_cannot_be_drawn(ui):
    from service import service

    from cellscan.errors import NoModelError
    from cellscan.serve.health import TrackingProbe

    fake = service._SERVICES[0]
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fake.probe = TrackingProbe(f"http://127.0.0.1:{port}")
    fake.holder = types.SimpleNamespace(current=lambda: (object(), 2), version=2)  # scan 1 was scored by 1
    r = ui.get("/ui/scans/1/heatmap.png")
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "model_unavailable", r.text
    assert "version 1" in r.json()["error"], r.text

    def nothing_served():  # type: ignore[no-untyped-def]
        msg = "no champion of model 'cellscan' is registered yet; train one first"
        raise NoModelError(msg)

    fake.holder = types.SimpleNamespace(current=nothing_served, version=None)
    r = ui.get("/ui/scans/1/heatmap.png")
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "no_model", r.text


def test_a_false_alarm_stored_outside_the_project_is_named_by_its_whole_path(ui, tmp_path_factory):
    from service import service

    from cellscan.serve.intake import DatasetIndex

    root = tmp_path_factory.mktemp("elsewhere") / "cells"  # data.root: an absolute folder outside the project
    (root / "training").mkdir(parents=True)
    (root / "training" / "n0.png").write_bytes(encode_png(np.zeros((8, 8), np.float32)))
    service._SERVICES[0].index = DatasetIndex(root, 10**8)
    r = ui.post("/ui/scans/2/verdict", json={"verdict": "false_alarm"}, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    assert r.json()["stored"].startswith(str(root / "temp")), r.text


def test_a_palette_scan_is_shown_in_its_colours(ui):
    import io

    from PIL import Image
    from service import service

    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red
    pal.paste(1, (0, 0, 4, 8))
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    log = PredictionLog.from_settings(service._SERVICES[0].settings)
    x = np.zeros((8, 8, 1), np.float32)
    rec = {"anomaly_score": 0.1, "reconstruction_error": 0.0, "threshold": 1.0, "is_anomaly": False}
    log.write([Item(x, buf.getvalue(), rec, None, "upload", "pal.png", 1, 0.01)])
    r = ui.get("/ui/scans/3/image.png")
    assert r.status_code == 200, r.text
    shown = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert tuple(shown[0, 0]) == (255, 0, 0), shown[0]  # red, not index 1 stretched to white
    assert tuple(shown[0, 7]) == (0, 0, 0), shown[0]
