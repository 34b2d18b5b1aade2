"""Batcher: batches requests, and with two workers scores two batches at once (ONNX Runtime)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cellscan.serve.runtime import Batcher


class _Result:
    def __init__(self, n: int) -> None:
        self.maps = np.zeros((n, 2, 2), np.float32)

    def record(self, i: int) -> dict:
        return {"i": i}


class _SlowModel:
    """Each batch takes 0.2 s; records the largest number of batches in progress at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.peak = 0
        self.sizes: list[int] = []

    def score_arrays(self, x: np.ndarray) -> _Result:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.sizes.append(len(x))
        time.sleep(0.2)
        with self.lock:
            self.running -= 1
        return _Result(len(x))


class _Holder:
    def __init__(self, model: _SlowModel) -> None:
        self.model = model

    def current(self) -> tuple[_SlowModel, int]:
        return self.model, 3


async def _burst(batcher: Batcher, n: int) -> list:
    return await asyncio.gather(*(batcher.score(np.zeros((2, 2, 1), np.float32)) for _ in range(n)))


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_run_on_as_many_workers_as_asked(workers):
    model = _SlowModel()
    batcher = Batcher(_Holder(model), max_batch=4, max_latency_ms=1, workers=workers)  # type: ignore[arg-type]
    out = asyncio.run(_burst(batcher, 16))
    assert len(out) == 16 and all(r[2] == 3 for r in out) and sum(model.sizes) == 16
    assert max(model.sizes) <= 4
    assert model.peak == workers


def test_a_failing_batch_fails_its_requests_and_frees_its_worker():
    class Broken(_SlowModel):
        def score_arrays(self, x):
            raise ValueError("bad batch")

    batcher = Batcher(_Holder(Broken()), max_batch=4, max_latency_ms=1, workers=2)  # type: ignore[arg-type]

    async def run() -> list:
        first = await asyncio.gather(*(batcher.score(np.zeros((2, 2, 1))) for _ in range(6)), return_exceptions=True)
        second = await asyncio.gather(*(batcher.score(np.zeros((2, 2, 1))) for _ in range(6)), return_exceptions=True)
        return first + second

    out = asyncio.run(asyncio.wait_for(run(), 10))
    assert len(out) == 12 and all(isinstance(e, ValueError) for e in out)


def test_each_image_is_scored_by_the_model_it_was_decoded_for():
    """A champion swapped in while images queue (perhaps with another input size) never scores them."""
    old, new = _SlowModel(), _SlowModel()
    batcher = Batcher(_Holder(new), max_batch=8, max_latency_ms=20)  # type: ignore[arg-type]

    async def run() -> list:
        return await asyncio.gather(
            batcher.score(np.zeros((2, 2, 1), np.float32), (old, 2)),  # type: ignore[arg-type]
            batcher.score(np.zeros((2, 2, 1), np.float32)),  # decoded for whatever serves now
            batcher.score(np.zeros((2, 2, 1), np.float32), (old, 2)),  # type: ignore[arg-type]
        )

    out = asyncio.run(asyncio.wait_for(run(), 10))
    assert [r[2] for r in out] == [2, 3, 2]
    assert [r[0]["i"] for r in out] == [0, 0, 1]  # each row of its own model's batch
    assert old.sizes == [2]
    assert new.sizes == [1]
