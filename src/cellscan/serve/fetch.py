"""Fetch images by URL safely: http(s) only, no private addresses, bounded time and size.

Rules (each refusal raises :class:`FetchError`, a 400 at the service):

- schemes: ``http`` and ``https``; ``file`` only when an allowed directory is configured, and only
  for paths inside it
- the host's addresses must all be public: loopback, private, link-local, multicast, reserved and
  unspecified ranges are refused unless the host (or ``host:port``, or a CIDR) is allow-listed
- redirects are followed by hand (at most 3), each hop checked again
- the host is resolved once and the connection goes to the address checked (no DNS rebinding)
- one total deadline for the whole fetch, a maximum download size, a cap on concurrent fetches;
  the content is checked by decoding it, not by its extension or Content-Type; error messages
  never quote what the remote answered
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

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


def _split(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, or FetchError for what urllib cannot parse."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port out of range, a broken IPv6 literal
        msg = f"image_url is not a valid URL ({exc}); expected http(s)://host[:port]/path"
        raise FetchError(msg) from None
    if not host:
        msg = "image_url has no host; expected http(s)://host/path"
        raise FetchError(msg)
    return parts.scheme.lower(), host, port or (443 if parts.scheme.lower() == "https" else 80)


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address; an IPv6 one that carries an IPv4 address (6to4, mapped) only if that one
    is too, and never a site-local one (fec0::/10, deprecated, still routed inside some sites).

    >>> [_public(ipaddress.ip_address(a)) for a in ("8.8.8.8", "2002:7f00:1::1", "fec0::1")]
    [True, False, False]

    (Python builds with the CVE-2024-4032 fix count all of 2002::/16 as not global: there every 6to4
    address is refused.)
    """
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:
            return False
        inner = ip.sixtofour or ip.ipv4_mapped
        if inner is not None:
            return _public(inner)
    return True


def _check_host(url: str, policy: FetchPolicy) -> str:
    """Resolve the host once and check every address; the address to connect to (pinned: no second lookup)."""
    _, host, port = _split(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        msg = f"image_url host {host[:100]!r} does not resolve"
        raise FetchError(msg) from None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not _public(ip) and not policy._allowed(host, port, ip):
            msg = (
                f"image_url host {host[:100]!r} resolves to non-public address {ip}; refused "
                "(only public http(s) hosts are fetched unless allow-listed in CELLSCAN_URL_ALLOWLIST)"
            )
            raise FetchError(msg)
    return str(infos[0][4][0]).split("%")[0]


def _read_file_url(url: str, policy: FetchPolicy) -> bytes:
    if policy.file_dir is None:
        msg = "file:// URLs are disabled; expected an http(s) URL (enable with CELLSCAN_FILE_URL_DIR)"
        raise FetchError(msg)
    try:
        path = Path(urlsplit(url).path).resolve()
    except ValueError as exc:  # a NUL byte in the path
        msg = f"file URL is not a valid path ({exc})"
        raise FetchError(msg) from None
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


_pool: ThreadPoolExecutor | None = None


def _resolver() -> ThreadPoolExecutor:
    """Name lookups run here, not in the default thread pool that decoding and uploads use."""
    global _pool  # noqa: PLW0603
    if _pool is None:
        _pool = ThreadPoolExecutor(4, thread_name_prefix="cellscan-resolve")
    return _pool


def _pinned(url: str, ip: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL with the checked address in place of the host, the Host header and the TLS name."""
    parts = urlsplit(url)
    scheme, host, port = _split(url)
    netloc = f"[{ip}]" if ":" in ip else ip
    if parts.port:
        netloc += f":{port}"
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    if not host.isascii():  # an internationalised name goes on the wire in its ASCII (IDNA) form
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            msg = f"{url}: the host name is not a valid internationalised domain name"
            raise FetchError(msg) from None
    host_header = (f"[{host}]" if ":" in host else host) + (f":{port}" if parts.port else "")
    return target, {"host": host_header}, ({"sni_hostname": host} if scheme == "https" else {})


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every fetch (certifi's CAs, as httpx's default). Building one per client loads the
    CA bundle each time: a third of the service's time at 32 clients, on the event loop."""
    return httpx.create_ssl_context(trust_env=False)


async def _get(url: str, policy: FetchPolicy, loop: asyncio.AbstractEventLoop) -> bytes:
    for _ in range(policy.max_redirects + 1):
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:  # a broken IPv6 literal
            msg = f"image_url is not a valid URL ({exc}); expected http(s)://host[:port]/path"
            raise FetchError(msg) from None
        if scheme == "file":
            return _read_file_url(url, policy)
        if scheme not in ("http", "https"):
            msg = f"image_url scheme {scheme[:20] or '(none)'!r} is not allowed; expected http or https"
            raise FetchError(msg)
        ip = await loop.run_in_executor(_resolver(), _check_host, url, policy)
        target, headers, ext = _pinned(url, ip)
        try:
            async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False, trust_env=False,
                                         verify=_tls()) as client:
                req = client.build_request("GET", target, headers=headers, extensions=ext)
                resp = await client.send(req, stream=True)
                try:
                    if resp.is_redirect:
                        url = urljoin(url, resp.headers.get("location", ""))
                        continue
                    if resp.status_code != 200:
                        msg = "image_url did not answer 200 OK; expected an image"
                        raise FetchError(msg)
                    declared = int(resp.headers.get("content-length") or 0)
                    if declared > policy.max_bytes:
                        msg = f"image_url content is larger than the limit of {policy.max_bytes} bytes"
                        raise FetchError(msg)
                    chunks, total = [], 0
                    async for chunk in resp.aiter_bytes():
                        total += len(chunk)
                        if total > policy.max_bytes:
                            msg = f"image_url content exceeds the limit of {policy.max_bytes} bytes"
                            raise FetchError(msg)
                        chunks.append(chunk)
                    return b"".join(chunks)
                finally:
                    await resp.aclose()
        except FetchError:
            raise
        except (httpx.HTTPError, httpx.InvalidURL, ssl.SSLError, OSError, ValueError) as exc:
            msg = f"image_url could not be fetched ({type(exc).__name__})"
            raise FetchError(msg) from None
    msg = f"image_url redirected more than {policy.max_redirects} times"
    raise FetchError(msg)


_limits: dict[tuple[int, int], asyncio.Semaphore] = {}


async def fetch_async(url: str, policy: FetchPolicy | None = None, max_concurrent: int = 8) -> bytes:
    """Download an image URL under ``policy`` within one total deadline; returns the raw bytes.

    The whole fetch (lookup, connect, redirects, every read) ends by ``policy.timeout_s``; the
    connection goes to the address that passed the check (no second lookup to rebind); at most
    ``max_concurrent`` fetches run at once in this event loop; errors never quote what was fetched.

    Raises:
        FetchError: the URL is refused, times out, answers an error status or is too large.
    """
    policy = policy or FetchPolicy()  # the strictest: public http(s) only
    if not isinstance(url, str) or not url.strip():
        msg = "image_url must be a non-empty string"
        raise FetchError(msg)
    if len(url) > 4096:
        msg = f"image_url is {len(url)} characters long; the limit is 4096"
        raise FetchError(msg)
    loop = asyncio.get_running_loop()
    key = (id(loop), max_concurrent)
    if key not in _limits:
        _limits[key] = asyncio.Semaphore(max_concurrent)
    async with _limits[key]:
        try:
            async with asyncio.timeout(policy.timeout_s):
                return await _get(url, policy, loop)
        except TimeoutError:
            msg = f"image_url took longer than {policy.timeout_s:g} s in all (CELLSCAN_FETCH_TIMEOUT)"
            raise FetchError(msg) from None


def fetch(url: str, policy: FetchPolicy | None = None) -> bytes:
    """:func:`fetch_async` for synchronous callers (not from inside a running event loop)."""
    return asyncio.run(fetch_async(url, policy))
