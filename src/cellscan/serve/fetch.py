"""Fetch images by URL safely: http(s) only, no private addresses, bounded time and size.

Rules (each refusal raises :class:`FetchError`, a 400 at the service):

- schemes: ``http`` and ``https``; ``file`` only when an allowed directory is configured, and only
  for paths inside it
- the host's addresses must all be public: loopback, private, link-local, multicast, reserved and
  unspecified ranges are refused unless the host (or ``host:port``, or a CIDR) is allow-listed
- redirects are followed by hand (at most 3), each hop checked again
- connect/read timeouts and a maximum download size; the content is checked by decoding it, not
  by its extension or Content-Type
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from cellscan.errors import FetchError
from cellscan.settings import Settings


@dataclass(frozen=True)
class FetchPolicy:
    allow: tuple[str, ...] = ()  # hosts, host:port pairs or CIDRs allowed even if private
    file_dir: Path | None = None  # file:// URLs allowed inside this directory only
    timeout_s: float = 5.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    _nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=(), repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        """The policy the settings describe (CELLSCAN_URL_ALLOWLIST, _FILE_URL_DIR, _FETCH_TIMEOUT, _FETCH_MAX_BYTES)."""
        return cls(allow=settings.url_allowlist, file_dir=settings.file_url_dir,
                   timeout_s=settings.fetch_timeout_s, max_bytes=settings.fetch_max_bytes)

    def _allowed(self, host: str, port: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        for entry in self.allow:
            if entry in (host, f"{host}:{port}", str(ip), f"{ip}:{port}"):
                return True
            try:
                if "/" in entry and ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False


def _check_host(url: str, policy: FetchPolicy) -> None:
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        msg = f"image_url has no host: {url!r}; expected http(s)://host/path"
        raise FetchError(msg)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        msg = f"image_url host {host!r} does not resolve"
        raise FetchError(msg) from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        public = ip.is_global and not (ip.is_multicast or ip.is_reserved)
        if not public and not policy._allowed(host, port, ip):
            msg = (
                f"image_url host {host!r} resolves to non-public address {ip}; refused "
                "(only public http(s) hosts are fetched unless allow-listed in CELLSCAN_URL_ALLOWLIST)"
            )
            raise FetchError(msg)


def _read_file_url(url: str, policy: FetchPolicy) -> bytes:
    if policy.file_dir is None:
        msg = "file:// URLs are disabled; expected an http(s) URL (enable with CELLSCAN_FILE_URL_DIR)"
        raise FetchError(msg)
    path = Path(urlsplit(url).path).resolve()
    if not path.is_relative_to(policy.file_dir):
        msg = f"file URL {path} is outside the allowed directory {policy.file_dir}"
        raise FetchError(msg)
    if not path.is_file():
        msg = f"file URL does not exist: {path}"
        raise FetchError(msg)
    if path.stat().st_size > policy.max_bytes:
        msg = f"file is larger than the limit of {policy.max_bytes} bytes: {path}"
        raise FetchError(msg)
    return path.read_bytes()


_clients: dict[float, httpx.Client] = {}


def _client(timeout: float) -> httpx.Client:
    """A shared client per timeout: connections are pooled and kept alive between fetches."""
    if timeout not in _clients:
        _clients[timeout] = httpx.Client(timeout=timeout, follow_redirects=False,
                                         limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
    return _clients[timeout]


def fetch(url: str, policy: FetchPolicy | None = None) -> bytes:
    """Download an image URL under ``policy`` (default: the strictest); returns the raw bytes.

    Raises:
        FetchError: the URL is refused, times out, answers an error status or is too large.
    """
    policy = policy or FetchPolicy()  # the strictest: public http(s) only
    if not isinstance(url, str) or not url.strip():
        msg = "image_url must be a non-empty string"
        raise FetchError(msg)
    for _ in range(policy.max_redirects + 1):
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file":
            return _read_file_url(url, policy)
        if scheme not in ("http", "https"):
            msg = f"image_url scheme {scheme or '(none)'!r} is not allowed; expected http or https"
            raise FetchError(msg)
        _check_host(url, policy)
        try:
            with _client(policy.timeout_s).stream("GET", url) as resp:
                if resp.is_redirect:
                    url = urljoin(url, resp.headers.get("location", ""))
                    continue
                if resp.status_code != 200:
                    msg = f"image_url answered HTTP {resp.status_code}; expected 200: {url}"
                    raise FetchError(msg)
                declared = int(resp.headers.get("content-length") or 0)
                if declared > policy.max_bytes:
                    msg = f"image_url content is {declared} bytes; the limit is {policy.max_bytes}"
                    raise FetchError(msg)
                chunks, total = [], 0
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > policy.max_bytes:
                        msg = f"image_url content exceeds the limit of {policy.max_bytes} bytes"
                        raise FetchError(msg)
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            msg = f"image_url timed out after {policy.timeout_s:g} s: {url}"
            raise FetchError(msg) from None
        except httpx.HTTPError as exc:
            msg = f"image_url could not be fetched ({type(exc).__name__}): {url}"
            raise FetchError(msg) from None
    msg = f"image_url redirected more than {policy.max_redirects} times"
    raise FetchError(msg)
