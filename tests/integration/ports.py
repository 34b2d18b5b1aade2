"""Ports for the servers the integration tests start.

A port found by binding port 0 comes from the kernel's ephemeral range and is free again as soon as
the test closes its probe socket, so the kernel may hand the same number to the next process that asks
for "any port": BentoML's process manager (circus) does exactly that for its control socket, and then
`bentoml serve --port N` fails with "Address already in use" on its own control socket. Ports handed
out here lie below the ephemeral range, and none is handed out twice in one test session.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_given: set[int] = set()
_rng = random.Random()


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens now, outside the range the kernel hands out itself."""
    top = min(_ephemeral_floor(), 65536) - 1
    low = 20000 if top > 21000 else 1024
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
