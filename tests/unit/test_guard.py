"""The service's guard policy, the API key file and the rotating log pipe (no server needed)."""

from __future__ import annotations

import io
import logging
import stat
import sys
from pathlib import Path

import pytest

from cellscan.serve.guard import ClientErrorLogFilter, GuardPolicy, ensure_key_file, json_body
from cellscan.serve.logpipe import pipe


@pytest.mark.parametrize(
    ("host", "local", "extra", "ok"),
    [
        ("127.0.0.1:3000", "127.0.0.1", (), True),  # the usual
        ("localhost", None, (), True),  # no port
        ("[::1]:3000", "::1", (), True),  # IPv6 loopback
        ("10.0.0.5:3000", "10.0.0.5", (), True),  # the address the client connected to
        ("evil.example:3000", "127.0.0.1", (), False),  # a rebinding name
        ("localhost.evil.example", "127.0.0.1", (), False),  # a suffix is not the name
        ("", "127.0.0.1", (), False),  # no Host header
        ("service:3000", "172.18.0.4", ("service",), True),  # allow-listed name
        ("anything", None, ("*",), True),  # explicitly any
    ],
)
def test_host_allow_list(host, local, extra, ok):
    assert GuardPolicy(allowed_hosts=extra).host_allowed(host, local) is ok


def test_key_compare():
    p = GuardPolicy(api_key="s3cret")
    assert p.key_ok(b"s3cret")
    assert not p.key_ok(b"s3cre") and not p.key_ok(None) and not p.key_ok(b"")
    assert not GuardPolicy().key_ok(b"")  # no key configured: nothing matches


def test_key_file_is_created_once_owner_only(tmp_path: Path):
    path = tmp_path / ".cellscan" / "api_key"
    assert ensure_key_file(path) is True
    key = path.read_text().strip()
    assert len(key) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_key_file(path) is False and path.read_text().strip() == key


def test_log_pipe_rotates_by_size(tmp_path: Path):
    log = tmp_path / "svc.log"
    pipe(io.BytesIO(b"".join(b"line %03d\n" % i for i in range(100))), log, max_bytes=200, keep=2)
    assert log.read_bytes().endswith(b"line 099\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]
    assert all(p.stat().st_size <= 200 for p in tmp_path.iterdir())


def test_openapi_documents_the_error_shape():
    from cellscan.serve.guard import document_errors

    spec = document_errors({"paths": {"/predict": {"post": {"responses": {"200": {}}}}, "/health": {"get": {}}}})
    assert spec["components"]["schemas"]["Error"]["required"] == ["error", "code"]
    responses = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "400", "413", "415"} <= set(responses)
    assert responses["415"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
    assert "responses" not in spec["paths"]["/health"]["get"]


def test_json_body_refuses_deep_nesting_as_invalid_json():
    assert json_body(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    with pytest.raises(ValueError, match="nested too deeply"):
        json_body(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(ValueError, match="Expecting property name"):
        json_body(b"{not json")


def _logged(exc: BaseException) -> logging.LogRecord:
    """A record as BentoML's log_exception writes it (exc_info of the exception being handled), filtered."""
    try:
        raise exc
    except BaseException:  # noqa: BLE001
        info = sys.exc_info()
    record = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on /predict", (), info)
    ClientErrorLogFilter().filter(record)
    return record


def test_client_mistakes_are_one_warning_line_server_faults_keep_their_traceback():
    from starlette.requests import ClientDisconnect

    gone = _logged(ClientDisconnect())  # a broken chunked body: the client went away mid-body
    assert gone.levelname == "WARNING"
    assert gone.exc_info is None
    assert "ClientDisconnect" in gone.getMessage()
    fault = _logged(RuntimeError("disk on fire"))
    assert fault.levelname == "ERROR"
    assert fault.exc_info is not None


def test_a_protected_route_called_with_the_wrong_method_is_405_key_or_no_key():
    """GET /retrain is a client's wrong method, not a missing key: 405 with Allow: POST; a keyless POST
    is still 401 and never reaches the app."""
    import asyncio
    import json

    from cellscan.serve.guard import Guard

    reached: list[str] = []

    async def app(scope, receive, send):  # what is behind the guard: answers 200 to anything it is given
        reached.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def call(method: str, key: bytes | None) -> tuple[int, dict, dict]:
        sent: list[dict] = []
        headers = [(b"host", b"127.0.0.1:3000"), (b"content-type", b"application/json"),
                   (b"content-length", b"0")]
        headers += [(b"x-api-key", key)] if key is not None else []
        scope = {"type": "http", "method": method, "path": "/retrain", "headers": headers,
                 "server": ("127.0.0.1", 3000)}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(Guard(app, lambda: GuardPolicy(api_key="k" * 32))(scope, receive, send))
        start = sent[0]
        return start["status"], dict(start["headers"]), json.loads(sent[-1]["body"])

    for key in (None, b"k" * 32):
        status, headers, body = call("GET", key)
        assert (status, headers[b"allow"], body["code"]) == (405, b"POST", "method_not_allowed")
        assert "/retrain accepts POST only, not GET" in body["error"]
    status, _, body = call("POST", None)
    assert (status, body["code"]) == (401, "missing_api_key")
    assert reached == []
    assert call("POST", b"k" * 32)[0] == 200
    assert reached == ["POST"]
