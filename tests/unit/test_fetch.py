"""The URL fetcher against a real loopback server: pinned address, one total deadline, nothing echoed."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cellscan.errors import FetchError
from cellscan.serve.fetch import FetchPolicy, fetch


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/drip":  # one byte every 0.2 s: each read is quick, the whole is slow
            self.send_response(200)
            self.send_header("Content-Length", "50")
            self.end_headers()
            try:
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        body = b"secret-body" if self.path == "/500" else b"image-bytes:" + self.headers["Host"].encode()
        self.send_response(500 if self.path == "/500" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def test_the_connection_goes_to_the_address_checked(server, monkeypatch):
    """A name that resolves to an allowed address once, then elsewhere (rebinding): only one lookup is made."""
    real = socket.getaddrinfo
    calls: list[str] = []

    def rebinding(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "rebind.test":
            calls.append(host)
            if len(calls) > 1:
                pytest.fail("the host was resolved a second time")
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    policy = FetchPolicy(allow=(f"127.0.0.1:{server}",))
    body = fetch(f"http://rebind.test:{server}/img.png", policy)
    assert body == f"image-bytes:rebind.test:{server}".encode()  # the Host header keeps the name
    assert calls == ["rebind.test"]


def test_an_internationalised_host_name_is_sent_in_its_ascii_form(server, monkeypatch):
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host in ("b\u00fccher.test", "xn--bcher-kva.test"):
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    body = fetch(f"http://b\u00fccher.test:{server}/img.png", FetchPolicy(allow=(f"127.0.0.1:{server}",)))
    assert body == f"image-bytes:xn--bcher-kva.test:{server}".encode()  # httpx cannot send a non-ASCII Host


def test_the_deadline_is_total_not_per_read(server):
    t0 = time.perf_counter()
    with pytest.raises(FetchError, match="longer than 1 s in all"):
        fetch(f"http://127.0.0.1:{server}/drip", FetchPolicy(allow=(f"127.0.0.1:{server}",), timeout_s=1.0))
    assert time.perf_counter() - t0 < 2.0


def test_errors_do_not_echo_the_answer(server):
    with pytest.raises(FetchError) as exc:
        fetch(f"http://127.0.0.1:{server}/500", FetchPolicy(allow=(f"127.0.0.1:{server}",)))
    assert "secret-body" not in str(exc.value) and "500" not in str(exc.value)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://example.com:99999/a.png", "Port out of range"),  # port past 65535
        ("http://[::1/a.png", "IPv6"),  # broken literal
        ("http://127.0.0.1:1/a.png", "non-public"),  # loopback, not allow-listed
        ("http://[::ffff:127.0.0.1]:1/a.png", "non-public"),  # IPv4-mapped loopback
        ("http://[2002:7f00:1::1]:1/a.png", "non-public"),  # 6to4 wrapping 127.0.0.1
        ("http://[2002:c0a8:101::1]:1/a.png", "non-public"),  # 6to4 wrapping 192.168.1.1
        ("http://[fec0::1]:1/a.png", "non-public"),  # site-local
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]:1/a.png", "non-public"),  # Teredo
        ("gopher://example.com/", "not allowed"),  # scheme
        ("http://x/" + "a" * 5000, "limit is 4096"),  # length
        ("http://8.8.8.8/a\x01.png", "InvalidURL"),  # a control character (httpx refuses it, not a 500)
    ],
)
def test_bad_urls_are_fetch_errors(url, needle):
    with pytest.raises(FetchError, match=needle):
        fetch(url)


def test_a_file_url_with_a_nul_byte_is_a_fetch_error(tmp_path):
    with pytest.raises(FetchError, match="not a valid path"):
        fetch("file://" + str(tmp_path / "a\x00b.png"), FetchPolicy(file_dir=tmp_path))
