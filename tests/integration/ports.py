"""Ports for the servers the integration tests start.

A port found by binding port 0 comes from the kernel's ephemeral range and is free again as soon as
the test closes its probe socket, so the kernel may hand the same number to the next process that asks
for "any port": BentoML's process manager (circus) does exactly that for its control socket, and then
`bentoml serve --port N` fails with "Address already in use" on its own control socket. Ports handed
out here lie outside the ephemeral range (below it, where there is room), and none is handed out twice
in one test session.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_given: set[int] = set()
_rng = random.Random()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default range
    return low, high


def _candidates() -> tuple[int, int]:
    """The widest stretch of unprivileged ports outside the ephemeral range (all of them if there is none)."""
    low, high = _ephemeral_range()
    below = (10000 if low > 11000 else 1024, low - 1)  # clear of common services' ports if room
    above = (high + 1, 65535)
    best = max(below, above, key=lambda r: r[1] - r[0])
    return best if best[1] - best[0] >= 1000 else (1024, 65535)


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens now, outside the range the kernel hands out itself."""
    low, top = _candidates()
    for _ in range(500):
        port = _rng.randint(low, top)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    msg = f"no free port between {low} and {top} on 127.0.0.1"
    raise RuntimeError(msg)
