"""Hostile requests against a real `bentoml serve`: each is a 4xx in the one error shape, never a 500,
and leaves the stored images, the registered models and the champion as they were."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cellscan.core.images import encode_png
from tests.integration.conftest import REPO, make_project
from tests.integration.test_service import _free_port, _wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "abuse-key-0123456789"
MAX_BODY = 2 * 1024 * 1024


class _Hostile(BaseHTTPRequestHandler):
    """/img.png (a fresh image), /drip (a byte every 0.3 s), /to-loopback (redirect to 127.0.0.1:1), else 404."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/img.png":
            body = encode_png(np.random.default_rng(5).random((48, 48)).astype(np.float32))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:
                pass
        elif self.path == "/to-loopback":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/x.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "14")
            self.end_headers()
            self.wfile.write(b"secret-content")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def svc(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("abuse")
    project = make_project(root / "proj", **{"retrain.epochs": 1})
    env = os.environ | {
        "CELLSCAN_HOME": str(project),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow/mlflow.db",
        "PREFECT_HOME": str(root / "prefect"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    for k in ("CELLSCAN_MODEL_NAME", "CELLSCAN_API_KEY", "CELLSCAN_API_KEY_FILE", "CELLSCAN_OPEN"):
        env.pop(k, None)
    subprocess.run([sys.executable, "-c", f"from flows.training import train_flow; train_flow(project={str(project)!r})"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    files = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    fport = files.server_address[1]
    port = _free_port()
    env |= {"CELLSCAN_API_KEY": KEY, "CELLSCAN_URL_ALLOWLIST": f"127.0.0.1:{fport}", "CELLSCAN_FETCH_TIMEOUT": "2",
            "CELLSCAN_MAX_BODY_BYTES": str(MAX_BODY), "CELLSCAN_POLL_SECONDS": "1"}
    log = root / "serve.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        yield {"base": f"http://127.0.0.1:{port}", "files": f"http://127.0.0.1:{fport}", "project": project,
               "log": log, "env": env, "root": root}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        files.shutdown()


def _state(svc) -> tuple[object, ...]:
    """What no refused request may change: every stored file, the versions, the champion."""
    data = svc["project"] / "data"
    files = sorted((str(p.relative_to(data)), p.stat().st_size) for p in data.rglob("*") if p.is_file())
    models = httpx.get(f"{svc['base']}/models", timeout=30).json()
    return tuple(files), models["serving"], tuple(v["version"] for v in models["versions"])


def _png(rng: int = 0, size: tuple[int, int] = (48, 48)) -> bytes:
    return encode_png(np.random.default_rng(rng).random(size).astype(np.float32))


def _tiff(value: float) -> bytes:
    a = np.random.default_rng(1).random((48, 48)).astype(np.float32)
    a[3, 3] = value
    buf = io.BytesIO()
    Image.fromarray(a, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def _stack() -> bytes:
    """Three CT slices in one multi-page TIFF."""
    pages = [Image.fromarray((np.random.default_rng(k).random((48, 48)) * 65535).astype(np.uint16)) for k in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def _ztxt_bomb() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("k", "x" * (20 * 1024 * 1024), zip=True)  # ~20 KB compressed, 20 MB text
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _big_flat(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def _stored(svc, name: str) -> bytes:
    return sorted((svc["project"] / "data/cells" / name).glob("*.png"))[0].read_bytes()


def _retiff(data: bytes) -> bytes:
    """The same pixels in another container (TIFF): still a duplicate."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="TIFF")
    return buf.getvalue()


K = {"x-api-key": KEY}
J = {"content-type": "application/json"}
# (id, method, route, request kwargs (callables get svc), status, code, needle)
CASES = [
    # -- safe defaults: content types, Host, cross-site, key ---------------------------------------
    ("text-plain-json", "POST", "/predict", {"content": b'{"image_url": "x"}', "headers": {"content-type": "text/plain"}},
     415, "unsupported_media_type", "text/plain"),
    ("form-urlencoded", "POST", "/rollback", {"content": b"version=1", "headers": K | {
        "content-type": "application/x-www-form-urlencoded"}}, 415, "unsupported_media_type", "multipart"),
    ("no-content-type", "POST", "/predict", {"content": b"{}"}, 415, "unsupported_media_type", "(none)"),
    ("rebinding-host-post", "POST", "/predict", {"json": {}, "headers": {"host": "evil.example"}}, 400,
     "host_not_allowed", "evil.example"),
    ("rebinding-host-get", "GET", "/models", {"headers": {"host": "rebind.example:3000"}}, 400, "host_not_allowed",
     "CELLSCAN_ALLOWED_HOSTS"),
    ("rebinding-host-key", "POST", "/rollback", {"json": {}, "headers": K | {"host": "a.b"}}, 400, "host_not_allowed", ""),
    ("rollback-no-key", "POST", "/rollback", {"json": {}}, 401, "missing_api_key", "X-API-Key"),
    ("rollback-wrong-key", "POST", "/rollback", {"json": {}, "headers": {"x-api-key": "nope"}}, 403, "wrong_api_key", ""),
    ("rollback-key-prefix", "POST", "/rollback", {"json": {}, "headers": {"x-api-key": KEY[:-1]}}, 403, "wrong_api_key", ""),
    ("retrain-get-no-key", "GET", "/retrain", {}, 405, "method_not_allowed", "accepts POST only"),
    ("retrain-no-key", "POST", "/retrain", {"files": {"image": ("a.png", _png(9), "image/png")}}, 401,
     "missing_api_key", ""),
    ("anomaly-wrong-key", "POST", "/anomaly", {"json": {"image_url": "http://x/y.png"}, "headers": {"x-api-key": ""}},
     403, "wrong_api_key", ""),
    ("cross-site-origin", "POST", "/predict", {"files": {"image": ("a.png", _png(), "image/png")},
                                               "headers": {"origin": "http://evil.example"}}, 403, "cross_site", "Origin"),
    ("cross-site-fetch", "POST", "/predict", {"files": {"image": ("a.png", _png(), "image/png")},
                                              "headers": {"sec-fetch-site": "cross-site"}}, 403, "cross_site", ""),
    ("same-site-other-port", "POST", "/predict", {"json": {}, "headers": {"sec-fetch-site": "same-site",
                                                                           "origin": "http://127.0.0.1:8080"}},
     403, "cross_site", ""),
    ("origin-null", "POST", "/predict", {"json": {}, "headers": {"origin": "null"}}, 403, "cross_site", ""),
    # -- bounded memory: bodies and decoding ---------------------------------------------------------
    ("json-too-large", "POST", "/predict", {"content": b" " * (2 * 1024 * 1024), "headers": J}, 413, "body_too_large",
     "limit"),
    ("json-chunked-too-large", "POST", "/predict",
     {"content": lambda s: iter([b" " * 65536] * 40), "headers": J}, 413, "body_too_large", "limit"),
    ("multipart-too-large", "POST", "/predict",
     {"files": {"image": ("a.png", b"\0" * (MAX_BODY + 10), "image/png")}}, 413, "body_too_large", "limit"),
    ("not-an-image", "POST", "/predict", {"files": {"image": ("a.png", b"hello", "image/png")}}, 400, "bad_request",
     "not an image"),
    ("empty-file", "POST", "/predict", {"files": {"image": ("a.png", b"", "image/png")}}, 400, "bad_request", "empty"),
    ("truncated-png", "POST", "/predict", {"files": {"image": ("a.png", _png()[:150], "image/png")}}, 400,
     "bad_request", "truncated"),
    ("truncated-stack", "POST", "/predict", {"files": {"image": ("vol.tif", _stack()[:1000], "image/tiff")}}, 400,
     "bad_request", "vol.tif: truncated or corrupt TIFF data"),
    ("tiff-stack", "POST", "/predict", {"files": {"image": ("vol.tif", _stack(), "image/tiff")}}, 400,
     "bad_request", "vol.tif: a stack of 3 pages"),
    ("tiff-stack-upload", "POST", "/retrain", {"files": {"image": ("vol.tif", _stack(), "image/tiff")},
                                               "headers": K}, 400, "bad_request", "a stack of 3 pages"),
    ("png-text-bomb", "POST", "/predict", {"files": {"image": ("a.png", _ztxt_bomb(), "image/png")}}, 400,
     "bad_request", "MAX_TEXT_CHUNK"),
    ("pixel-bomb", "POST", "/predict", {"files": {"image": ("a.png", _big_flat(5000), "image/png")}}, 400,
     "bad_request", "expected at most"),
    ("float-inf", "POST", "/predict", {"files": {"image": ("a.tif", _tiff(np.inf), "image/tiff")}}, 400,
     "bad_request", "non-finite"),
    ("float-nan", "POST", "/predict", {"files": {"image": ("a.tif", _tiff(np.nan), "image/tiff")}}, 400,
     "bad_request", "non-finite"),
    ("gif", "POST", "/predict", {"files": {"image": ("a.gif", _gif(), "image/gif")}}, 400, "bad_request",
     "unsupported format"),
    # -- URLs ------------------------------------------------------------------------------------
    ("port-out-of-range", "POST", "/predict", {"json": {"image_url": "http://example.com:99999/a.png"}}, 400,
     "bad_request", "Port out of range"),
    ("broken-ipv6", "POST", "/predict", {"json": {"image_url": "http://[::1/a.png"}}, 400, "bad_request", "IPv6"),
    ("ftp", "POST", "/predict", {"json": {"image_url": "ftp://example.com/a.png"}}, 400, "bad_request", "ftp"),
    ("file-url", "POST", "/predict", {"json": {"image_url": "file:///etc/passwd"}}, 400, "bad_request", "file://"),
    ("loopback", "POST", "/predict", {"json": {"image_url": "http://127.0.0.1:1/a.png"}}, 400, "bad_request",
     "non-public"),
    ("loopback-hex", "POST", "/predict", {"json": {"image_url": "http://0x7f000001:1/a.png"}}, 400, "bad_request",
     "non-public"),
    ("loopback-v6", "POST", "/predict", {"json": {"image_url": "http://[::1]:1/a.png"}}, 400, "bad_request",
     "non-public"),
    ("metadata-ip", "POST", "/predict", {"json": {"image_url": "http://169.254.169.254/latest"}}, 400, "bad_request",
     "non-public"),
    ("redirect-to-loopback", "POST", "/predict", {"json": lambda s: {"image_url": f"{s['files']}/to-loopback"}}, 400,
     "bad_request", "non-public"),
    ("remote-404-not-echoed", "POST", "/predict", {"json": lambda s: {"image_url": f"{s['files']}/missing.png"}}, 400,
     "bad_request", "did not answer 200"),
    ("slow-drip", "POST", "/predict", {"json": lambda s: {"image_url": f"{s['files']}/drip"}}, 400, "bad_request",
     "longer than 2 s"),
    ("url-too-long", "POST", "/predict", {"json": {"image_url": "http://example.com/" + "a" * 5000}}, 400,
     "bad_request", "limit is 4096"),
    ("url-not-a-string", "POST", "/predict", {"json": {"image_url": 5}}, 400, "bad_request", "valid string"),
    ("url-garbage", "POST", "/predict", {"json": {"image_url": "not a url"}}, 400, "bad_request", "scheme"),
    # -- forms and fields --------------------------------------------------------------------------
    ("text-in-file-field", "POST", "/predict", {"data": {"image": "http://127.0.0.1:1/a.png"},
                                                 "files": {"images": ("a.png", _png(), "image/png")}}, 400, "bad_request",
     "uploaded files only"),
    ("unknown-form-field", "POST", "/predict", {"files": {"image": ("a.png", _png(), "image/png")},
                                                 "data": {"colour": "red"}}, 400, "bad_request", "unknown form field"),
    ("batch-too-big", "POST", "/predict", {"json": {"image_urls": ["http://example.com/a.png"] * 257}}, 400,
     "bad_request", "at most 256"),
    ("one-and-batch", "POST", "/predict", {"json": {"image_url": "http://a/b", "image_urls": ["http://a/c"]}}, 400,
     "bad_request", "either one image"),
    ("bad-bool", "POST", "/predict", {"json": {"image_url": "http://a/b", "heatmap": "maybe"}}, 400, "bad_request",
     "heatmap"),
    ("invalid-json", "POST", "/predict", {"content": b"{not json", "headers": J}, 400, "bad_request", ""),
    ("json-array", "POST", "/predict", {"content": b"[1, 2]", "headers": J}, 400, "bad_request", ""),
    ("unknown-route", "POST", "/nope", {"json": {}}, 404, "not_found", ""),
    ("unknown-job", "GET", "/jobs/" + "z" * 300, {}, 404, "not_found", "no job"),
    # -- data: only valid, new images ------------------------------------------------------------
    ("anomaly-defect-good", "POST", "/anomaly", {"files": {"image": ("a.png", _png(11), "image/png")},
                                                 "data": {"defect": "good"}, "headers": K}, 400, "bad_request",
     "normal class"),
    ("anomaly-defect-path", "POST", "/anomaly", {"files": {"image": ("a.png", _png(11), "image/png")},
                                                 "data": {"defect": "../../etc"}, "headers": K}, 400, "bad_request",
     "defect"),
    ("retrain-copy-of-train", "POST", "/retrain",
     {"files": lambda s: {"image": ("v.png", _stored(s, "train/good"), "image/png")}, "headers": K}, 409,
     "duplicate_image", "already in the dataset"),
    ("anomaly-copy-as-tiff", "POST", "/anomaly",
     {"files": lambda s: {"image": ("v.tif", _retiff(_stored(s, "test/good")), "image/tiff")}, "headers": K}, 409,
     "duplicate_image", "test/good"),
    ("retrain-float-inf", "POST", "/retrain", {"files": {"image": ("a.tif", _tiff(np.inf), "image/tiff")},
                                               "headers": K}, 400, "bad_request", "non-finite"),
    ("rollback-version-0", "POST", "/rollback", {"json": {"version": 0}, "headers": K}, 400, "bad_request", "version"),
    ("rollback-version-text", "POST", "/rollback", {"json": {"version": "x"}, "headers": K}, 400, "bad_request",
     "version"),
    ("rollback-unknown-version", "POST", "/rollback", {"json": {"version": 999}, "headers": K}, 404, "not_found", "999"),
    ("rollback-version-true", "POST", "/rollback", {"json": {"version": True}, "headers": K}, 400,
     "bad_request", "version"),  # not version 1
    ("rollback-version-string", "POST", "/rollback", {"json": {"version": "1"}, "headers": K}, 400,
     "bad_request", "version"),
    ("deep-json", "POST", "/predict", {"content": b'{"image_url": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                       "headers": J}, 400, "bad_request", "recursion"),
    ("deep-json-edge", "POST", "/edge/results",
     {"content": b'{"records": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": K | J}, 400, "bad_request",
     "nested too deeply"),
    ("multipart-no-boundary", "POST", "/predict", {"content": b"x", "headers": {
        "Content-Type": "multipart/form-data"}}, 400, "bad_request", "multipart"),
    ("multipart-huge-part-header", "POST", "/predict",
     {"files": {"image": ("a" * 9000 + ".png", _png(), "image/png")}}, 400, "bad_request", "multipart"),
    ("file-in-a-text-field", "POST", "/predict", {"files": {"image_url": ("x.png", _png(), "image/png")}},
     400, "bad_request", "takes text"),
    ("deep-form-field", "POST", "/predict", {"files": {"image": ("a.png", _png(), "image/png")},
                                             "data": {"heatmap": "[" * 5000}}, 400, "bad_request",
     "nested too deeply"),
    ("heatmap-batch-too-big", "POST", "/predict",
     {"json": {"image_urls": ["http://example.com/a.png"] * 17, "heatmap": True}}, 400, "bad_request",
     "at most 16"),
]


@pytest.mark.parametrize(("method", "route", "kwargs", "status", "code", "needle"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_request_is_a_clear_4xx_and_changes_nothing(svc, method, route, kwargs, status, code, needle):
    before = _state(svc)
    kw = {k: (v(svc) if callable(v) else v) for k, v in kwargs.items()}
    t0 = time.perf_counter()
    with httpx.Client(base_url=svc["base"], timeout=60) as c:
        r = c.request(method, route, **kw)
        took = time.perf_counter() - t0
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error", "code"}, body
        assert body["code"] == code and isinstance(body["error"], str) and needle in body["error"], body
        assert "secret-content" not in r.text  # what a fetched URL answered is never echoed
        assert took < 10, took  # the fetch deadline is total (2 s), not per read
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    assert _state(svc) == before


def test_no_client_error_logged_a_traceback(svc):
    with httpx.Client(base_url=svc["base"], timeout=60) as c:
        assert c.post("/predict", files={"image": ("a.png", b"junk", "image/png")}).status_code == 400
    time.sleep(0.5)
    text = svc["log"].read_text()
    assert "Traceback" not in text
    assert "[WARNING]" in text and "not an image" in text


def test_the_openapi_document_has_the_error_shape(svc):
    spec = httpx.get(f"{svc['base']}/docs.json", timeout=30).json()
    assert spec["components"]["schemas"]["Error"]["required"] == ["error", "code"]
    for route in ("/predict", "/retrain", "/anomaly", "/rollback"):
        assert {"400", "413", "415"} <= set(spec["paths"][route]["post"]["responses"]), route


def test_errors_name_the_upload_as_the_client_named_it(svc):
    """Not BentoML's temporary file (tmp + 8 random characters + the name)."""
    with httpx.Client(base_url=svc["base"], timeout=60) as c:
        r = c.post("/predict", files={"image": ("scan-0042.png", b"junk", "image/png")})
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("scan-0042.png:"), r.text


@pytest.mark.parametrize("name", ["a" * 300 + ".png", "\u96ea" * 90 + ".png"], ids=["ascii", "cjk-274-bytes"])
def test_long_filename_is_served_not_a_500(svc, name):
    with httpx.Client(base_url=svc["base"], timeout=60) as c:
        r = c.post("/predict", files={"image": (name, _png(), "image/png")})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["is_anomaly"], bool)


def test_rollback_to_a_version_that_cannot_serve_leaves_the_champion(svc):
    import mlflow

    mc = mlflow.MlflowClient(tracking_uri=svc["env"]["MLFLOW_TRACKING_URI"])
    broken = mc.create_model_version("cellscan", str(svc["root"] / "no-such-model"))  # its files are gone
    before = _state(svc)
    with httpx.Client(base_url=svc["base"], timeout=120, headers=K) as c:
        r = c.post("/rollback", json={"version": int(broken.version)})
        assert r.status_code == 409, r.text
        assert r.json()["code"] == "not_servable", r.text
        assert "the champion is unchanged" in r.json()["error"], r.text
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/predict", files={"image": ("a.png", _png(), "image/png")}).status_code == 200
    assert _state(svc) == before
    assert mc.get_model_version_by_alias("cellscan", "champion").version != broken.version


def test_without_a_champion_predict_and_retrain_say_why(svc, tmp_path):
    """A 503 that names the missing champion, not BentoML's generic text for any 5xx."""
    env = svc["env"] | {"CELLSCAN_MODEL_NAME": "never-trained"}
    port = _free_port()
    log = tmp_path / "nomodel.log"
    serve = [str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan",
             "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(serve, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=K) as c:
            for route in ("/predict", "/retrain"):
                r = c.post(route, files={"image": ("a.png", _png(3), "image/png")})
                assert r.status_code == 503, r.text
                assert r.json()["code"] == "no_model", r.text
                assert "never-trained" in r.json()["error"], r.text
            assert c.get("/health").json()["status"] == "no_model"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_a_mixed_batch_answers_per_item(svc):
    with httpx.Client(base_url=svc["base"], timeout=60) as c:
        r = c.post("/predict", json={"image_urls": [f"{svc['files']}/img.png", "http://[::1/x", "ftp://a/b"]})
        assert r.status_code == 200, r.text
        ok, bad, ftp = r.json()
        assert isinstance(ok["is_anomaly"], bool)
        assert bad == {"index": 1, "error": bad["error"], "code": "bad_request"} and "IPv6" in bad["error"]
        assert ftp["index"] == 2 and "ftp" in ftp["error"]


def test_polyglot_is_stored_as_its_pixels_only(svc):
    """A PNG with a ZIP behind it: accepted as the image it shows, stored re-encoded (no archive)."""
    pixels = (np.random.default_rng(21).random((48, 48)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    polyglot = buf.getvalue() + b"PK\x03\x04" + b"\0" * 26 + b"evil.sh" + b"#!/bin/sh\n"
    with httpx.Client(base_url=svc["base"], timeout=120, headers=K) as c:
        r = c.post("/anomaly", files={"image": ("p.png", polyglot, "image/png")},
                   data={"defect": "crack", "wait": "false"})
        assert r.status_code == 200, r.text
        stored = svc["project"] / r.json()["stored"][0]
        data = stored.read_bytes()
        assert b"PK\x03\x04" not in data and stored.suffix == ".png"
        assert np.array_equal(np.asarray(Image.open(stored)), pixels)
        # The same pixels again, in any container: 409 naming where they are.
        again = c.post("/anomaly", files={"image": ("q.png", buf.getvalue(), "image/png")}, data={"defect": "crack"})
        assert again.status_code == 409 and stored.name in again.json()["error"]
        job = r.json()["job_id"]
        for _ in range(300):
            if c.get(f"/jobs/{job}").json()["status"] in ("done", "failed"):
                break
            time.sleep(1)


def test_the_service_refuses_to_start_without_a_key(svc, tmp_path):
    env = {k: v for k, v in svc["env"].items() if k not in ("CELLSCAN_API_KEY", "CELLSCAN_API_KEY_FILE")}
    port = _free_port()
    log = tmp_path / "nokey.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Cellscan",
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "no API key" not in log.read_text():
            time.sleep(1)
        assert "CELLSCAN_OPEN=1" in log.read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).raise_for_status()
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
