"""Is the MLflow tracking store reachable? A cheap check for ``/health`` and the routes that need MLflow.

The MLflow client retries a refused connection for minutes; the service must not wait that long to
learn that the server is down. :class:`TrackingProbe` asks once, with a short timeout, and keeps the
answer for ``ttl_s`` seconds:

- ``http(s)://`` (an ``mlflow server``): ``GET <uri>/health`` must answer 200;
- ``sqlite:///path``: the database opens read-only (a missing file is fine: it is made on first use);
- other database URLs (``postgresql://``, ``mysql://``): a TCP connection to their host and port;
- anything else (``file:``, ``databricks``): not checked.

While the probe fails the service keeps scoring with the champion it has loaded, ``/health`` says
``degraded`` and why, and the routes that change models answer 503 ``mlflow_unavailable``.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def redact(uri: str) -> str:
    """The URI without user name and password (they never reach an answer or a log)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


class TrackingProbe:
    """Whether the tracking store at ``uri`` answers, asked at most once per ``ttl_s`` seconds."""

    def __init__(self, uri: str, timeout_s: float = 2.0, ttl_s: float = 2.0) -> None:
        self.uri = uri
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._error: str | None = None

    def error(self) -> str | None:
        """None when the store answers, else what went wrong (naming MLflow and the redacted URI)."""
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                problem = self._check()
                self._error = None if problem is None else f"MLflow tracking store {redact(self.uri)} unreachable: {problem}"
                self._at = time.monotonic()
            return self._error

    def ok(self) -> bool:
        return self.error() is None

    def _check(self) -> str | None:
        scheme = urlsplit(self.uri).scheme.split("+")[0].lower()
        try:
            if scheme in ("http", "https"):
                return self._http()
            if scheme == "sqlite":
                return self._sqlite()
            if scheme in DB_PORTS:
                return self._tcp(scheme)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror or exc}"
        return None

    def _http(self) -> str | None:
        parts = urlsplit(self.uri)  # without user:password (MLflow's /health needs none)
        url = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:  # noqa: S310 (the operator's URI)
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except urllib.error.URLError as exc:
            reason = exc.reason
            return f"{type(reason).__name__}: {getattr(reason, 'strerror', None) or reason}"
        return None if status == 200 else f"GET /health answered HTTP {status}"

    def _sqlite(self) -> str | None:
        path = Path(self.uri.removeprefix("sqlite:///"))
        if not path.exists():
            return None
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=self.timeout_s)
        try:
            conn.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.Error as exc:
            return f"sqlite: {exc}"
        finally:
            conn.close()
        return None

    def _tcp(self, scheme: str) -> str | None:
        parts = urlsplit(self.uri)
        host, port = parts.hostname or "localhost", parts.port or DB_PORTS[scheme]
        with socket.create_connection((host, port), timeout=self.timeout_s):
            return None
