"""BentoML's per-request timeout timer is cancelled when the request ends (it kept each request's context,
tracing span included, alive for the whole timeout: a leak of about 5 KB per request)."""

from __future__ import annotations

import asyncio

import pytest


async def _app(scope, receive, send):  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _failing_app(scope, receive, send):  # type: ignore[no-untyped-def]
    raise RuntimeError("boom")


async def _live_timers(middleware, n: int) -> int:  # type: ignore[no-untyped-def]
    sent: list[dict[str, object]] = []

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    async def receive():  # type: ignore[no-untyped-def]
        return {"type": "http.request", "body": b""}

    for _ in range(n):
        await middleware({"type": "http"}, receive, send)
    assert sum(m["type"] == "http.response.start" for m in sent) == n
    loop = asyncio.get_running_loop()
    return sum(1 for h in loop._scheduled if not h.cancelled())  # type: ignore[attr-defined]


def test_no_timer_outlives_its_request():
    import service.service  # noqa: F401 (applies the patch)
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    assert asyncio.run(_live_timers(TimeoutMiddleware(_app, timeout=3600), 200)) == 0


def test_an_app_that_fails_without_answering_does_not_wait_for_the_timeout():
    import service.service  # noqa: F401
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    async def run() -> None:
        await asyncio.wait_for(TimeoutMiddleware(_failing_app, timeout=3600)({"type": "http"}, None, None), 5)

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(run())
