"""The service's front door: one ASGI middleware that checks every request before BentoML sees it.

In order, each refusal answered with the one error shape ``{"error": message, "code": slug}``:

- the Host header must be an allowed name (localhost names, the address the client connected to,
  CELLSCAN_ALLOWED_HOSTS): a DNS-rebinding page cannot read answers (400 ``host_not_allowed``)
- POST bodies must be JSON or multipart (415 ``unsupported_media_type``), and no larger than the cap,
  checked from Content-Length and again while the body streams in (413 ``body_too_large``)
- a browser's cross-site POST (Origin of another host, or Sec-Fetch-Site other than same-origin /
  none) is refused unless it carries the right API key (403 ``cross_site``)
- the mutating routes need the API key, compared in constant time (401 ``missing_api_key``, 403
  ``wrong_api_key``); with no key configured they are refused unless the service runs in open mode;
  they take POST only, and another method is answered 405 ``method_not_allowed`` before the key is asked for

Error answers of the app below (BentoML's ``[{"error"}]`` and ``{"error", "detail"}``, FastAPI's
``{"detail"}``) are rewritten into the same shape, and :class:`ClientErrorLogFilter` turns BentoML's
traceback for a client's mistake into one WARNING line.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
BODY_TYPES = ("application/json", "multipart/form-data")
JSON_MAX_BYTES = 1024 * 1024  # a JSON body holds URLs and flags, never image data
CODES = {400: "bad_request", 401: "missing_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         409: "conflict", 413: "body_too_large", 415: "unsupported_media_type", 422: "bad_request",
         429: "too_many_jobs", 500: "internal_error", 503: "unavailable", 507: "storage_error"}


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes the cap (answered 413, logged as one line)."""


def ensure_key_file(path: Path) -> bool:
    """Create an API key file readable by its owner only (mode 600) unless it exists; True if created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return True


@dataclass(frozen=True)
class GuardPolicy:
    """What the guard enforces; :meth:`from_settings` builds it from cellscan's settings."""

    api_key: str | None = None
    open_mode: bool = False
    allowed_hosts: tuple[str, ...] = ()  # besides LOCAL_HOSTS and the connection's own address; "*": any
    max_body_bytes: int = 64 * 1024 * 1024
    protected: tuple[str, ...] = ("/retrain", "/anomaly", "/rollback", "/edge/results")

    @classmethod
    def from_settings(cls, settings: Any) -> GuardPolicy:
        return cls(api_key=settings.api_key, open_mode=settings.open_mode,
                   allowed_hosts=tuple(getattr(settings, "allowed_hosts", ())),
                   max_body_bytes=int(getattr(settings, "max_body_bytes", cls.max_body_bytes)))

    def host_allowed(self, host: str, local_addr: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        name = host.strip().lower()
        if name.startswith("["):  # [::1]:3000
            name = name.split("]")[0] + "]"
        elif name.count(":") == 1:
            name = name.split(":")[0]
        allowed = {*LOCAL_HOSTS, *(h.lower() for h in self.allowed_hosts)}
        if local_addr:
            allowed |= {local_addr.lower(), f"[{local_addr.lower()}]"}
        return name in allowed

    def key_ok(self, got: bytes | None) -> bool:
        return bool(self.api_key) and got is not None and hmac.compare_digest(got, self.api_key.encode())


def json_body(raw: bytes | str) -> Any:
    """A request body as JSON. Raises ValueError for invalid JSON and for JSON nested too deeply to parse
    (Python's parser would raise RecursionError, which is no client error)."""
    try:
        return json.loads(raw)
    except RecursionError:
        msg = "JSON nested too deeply"
        raise ValueError(msg) from None


def error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": message, "code": code}).encode()


def _message_of(raw: bytes, status: int) -> str:
    """The message inside any error body the app below produced."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        return str(data)[:500]
    if isinstance(data.get("detail"), list):  # pydantic: name the fields and what they expect
        parts = []
        for e in data["detail"]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",))
            parts.append(f"{loc}: {e.get('msg', '')}" if loc else str(e.get("msg", "")))
        return "; ".join(parts) or str(data.get("error", f"HTTP {status}"))
    msg = data.get("error", data.get("detail", f"HTTP {status}"))
    return msg if isinstance(msg, str) else json.dumps(msg)


ERROR_SCHEMA = {
    "type": "object",
    "description": "Every error answer (a batch item that failed also carries its index)",
    "required": ["error", "code"],
    "properties": {"error": {"type": "string", "description": "what was expected and what arrived"},
                   "code": {"type": "string", "description": "a stable slug, e.g. " + ", ".join(sorted(
                       {*CODES.values(), "host_not_allowed", "cross_site", "duplicate_image", "wrong_api_key",
                        "mlflow_unavailable"}))},
                   "index": {"type": "integer", "description": "batch items only: the failed item's position"}},
}
ERROR_STATUSES = {"400": "invalid input (image, URL, field, Host)", "401": "missing API key", "403": "wrong API key or cross-site",
                  "409": "the image is already in the dataset", "413": "body too large",
                  "415": "not JSON or multipart", "429": "too many trainings pending (Retry-After)",
                  "503": "MLflow unreachable (mlflow_unavailable) or no model yet",
                  "507": "the disk is full: nothing was stored (storage_error)"}


def document_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the one error shape to an OpenAPI document: a schema and the 4xx answers of every POST route."""
    spec.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for item in spec.get("paths", {}).values():
        op = item.get("post") if isinstance(item, dict) else None
        if isinstance(op, dict):
            responses = op.setdefault("responses", {})
            for status, text in ERROR_STATUSES.items():
                responses.setdefault(status, {"description": text} | ref)
    return spec


class Guard:
    """ASGI middleware enforcing a :class:`GuardPolicy` (``policy`` is called per request: read lazily)."""

    def __init__(self, app: Any, policy: Callable[[], GuardPolicy]) -> None:
        self.app = app
        self.policy = policy

    @staticmethod
    async def _answer(send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
        body = error_body(message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: C901, PLR0911, PLR0912
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        policy = self.policy()
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.lower(), v)
        path = scope.get("path", "").rstrip("/") or "/"
        method = scope.get("method", "GET")
        host = headers.get(b"host", b"").decode("latin-1")
        local = (scope.get("server") or (None,))[0]
        if not policy.host_allowed(host, local):
            msg = f"Host header {host[:100]!r} is not allowed; expected localhost or a name in CELLSCAN_ALLOWED_HOSTS"
            logger.warning("refused %s %s: %s", method, path, msg)
            return await self._answer(send, 400, msg, "host_not_allowed")
        keyed = policy.key_ok(headers.get(b"x-api-key"))
        limit = policy.max_body_bytes
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            length_raw = headers.get(b"content-length")
            try:
                length = int(length_raw) if length_raw is not None else None
            except ValueError:
                return await self._answer(send, 400, "Content-Length is not a number", "bad_request")
            if ctype not in BODY_TYPES and not (ctype == "" and length == 0):
                msg = f"Content-Type {ctype or '(none)'!r} is not accepted; send application/json or multipart/form-data"
                logger.warning("refused %s %s: %s", method, path, msg)
                return await self._answer(send, 415, msg, "unsupported_media_type")
            limit = JSON_MAX_BYTES if ctype == "application/json" else policy.max_body_bytes
            if length is not None and length > limit:
                msg = f"request body is {length} bytes; the limit for {ctype} is {limit}"
                logger.warning("refused %s %s: %s", method, path, msg)
                return await self._answer(send, 413, msg, "body_too_large")
            if not keyed:
                origin = headers.get(b"origin", b"").decode("latin-1")
                site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
                cross = site not in ("", "same-origin", "none")
                if origin:
                    o = urlsplit(origin)
                    cross = cross or origin == "null" or (o.netloc or "").lower() != host.lower()
                if cross:
                    msg = "cross-site request refused (Origin / Sec-Fetch-Site); send the X-API-Key header"
                    logger.warning("refused %s %s from origin %r", method, path, origin[:100])
                    return await self._answer(send, 403, msg, "cross_site")
        if path in policy.protected:
            if method != "POST":  # nothing else reaches these routes: say so, whether or not a key came
                return await self._answer(send, 405, f"{path} accepts POST only, not {method[:10]}",
                                          "method_not_allowed", [(b"allow", b"POST")])
            if not policy.api_key and not policy.open_mode:
                msg = "no API key is configured; set CELLSCAN_API_KEY(_FILE), or CELLSCAN_OPEN=1 to allow changes"
                return await self._answer(send, 403, msg, "no_api_key_configured")
            if policy.api_key and not keyed:
                if headers.get(b"x-api-key") is None:
                    return await self._answer(send, 401, "missing API key: send it in the X-API-Key header",
                                              "missing_api_key")
                return await self._answer(send, 403, "wrong API key (X-API-Key header)", "wrong_api_key")

        if path == "/docs.json" and method == "GET":
            return await self._documented(scope, receive, send)
        state = {"read": 0, "too_large": False, "started": False, "status": 0, "buffer": [], "rewrite": False,
                 "headers": []}

        async def capped_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    state["too_large"] = True
                    msg = f"request body passed the limit of {limit} bytes"
                    raise BodyTooLarge(msg)
            return message

        async def shaped_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["headers"] = [(k, v) for k, v in message.get("headers", [])
                                    if k.lower() not in (b"content-length", b"content-type")]
                html_page = str(scope.get("path", "")).startswith("/ui/") and any(
                    k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in message.get("headers", []))
                # the operators' pages keep their own error pages (a browser shows them); the API answers JSON
                state["rewrite"] = (message["status"] >= 400 and not html_page) or state["too_large"]
                if not state["rewrite"]:
                    await send(message)
                return
            if not state["rewrite"]:
                return await send(message)
            state["buffer"].append(message.get("body", b""))
            if message.get("more_body"):
                return None
            # FastAPI's 422 (a parameter of the wrong type) is invalid input: the documented 400
            status = 400 if state["status"] == 422 else state["status"]
            raw = b"".join(state["buffer"])
            if state["too_large"]:
                status, text, code = 413, f"request body passed the limit of {limit} bytes", "body_too_large"
            else:
                try:
                    data = json.loads(raw)
                    shaped = isinstance(data, dict) and isinstance(data.get("code"), str) and isinstance(
                        data.get("error"), str)
                except (ValueError, UnicodeDecodeError):
                    shaped = False
                if shaped:
                    text, code = data["error"], data["code"]
                    extra = {k: v for k, v in data.items() if k not in ("error", "code")}
                else:
                    text, code, extra = _message_of(raw, status), CODES.get(status, "error"), {}
                if status >= 500 and not shaped:
                    text = "internal error; the server log says more"
                body = json.dumps({"error": text, "code": code} | extra).encode()
                return await self._send_shaped(send, status, body, state["headers"])
            await self._send_shaped(send, status, error_body(text, code), state["headers"])
            return None

        return await self.app(scope, capped_receive, shaped_send)

    async def _documented(self, scope: Scope, receive: Receive, send: Send) -> None:
        """BentoML's OpenAPI document with the error shape added."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def grab(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, grab)
        body = b"".join(chunks)
        if start.get("status") == 200:
            try:
                body = json.dumps(document_errors(json.loads(body))).encode()
            except (ValueError, TypeError, AttributeError):
                pass
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": start.get("status", 500),
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _send_shaped(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs every refused request with a traceback at ERROR: make a client's mistake one WARNING line
    (a refusal with a 4xx status, a validation error, a body over the cap, or a client that went away
    mid-body, such as one sending a broken chunked body)."""

    CLIENT_SIDE = ("ValidationError", "ClientDisconnect")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        status = getattr(getattr(exc, "error_code", None), "value", None)
        client = isinstance(exc, BodyTooLarge) or type(exc).__name__ in self.CLIENT_SIDE or (
            isinstance(status, int) and 400 <= status < 500)
        if client:
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            record.msg, record.args = "%s: %s", (record.getMessage(), f"{type(exc).__name__}: {first}")
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def install_log_filter() -> None:
    """Attach :class:`ClientErrorLogFilter` to the logger BentoML's ``log_exception`` uses."""
    for name in ("bentoml._internal.server.http_app", "_bentoml_impl.server.app"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, ClientErrorLogFilter) for f in lg.filters):
            lg.addFilter(ClientErrorLogFilter())
