"""Serving state behind the BentoML service: the champion and batching.

- :class:`ModelHolder` keeps the MLflow champion loaded and swaps in a new one when the alias moves
  (promotion, rollback), by polling and on demand. A request keeps the model object it started
  with, so a swap never drops requests in flight. With ``CELLSCAN_RUNTIME=onnx`` (or ``tflite``)
  the champion's networks run from its export (:func:`cellscan.mlops.export.serving_model`, made on
  demand when missing) and the numpy scoring after them stays the same.
- :class:`Batcher` gathers concurrent predictions for a few milliseconds and scores them in one
  model call (adaptive batching: the batch grows with the load).

Training jobs live in :mod:`cellscan.serve.jobs`: they run in other processes, never here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellscan.core.bundle import CellscanModel
from cellscan.errors import NoModelError, ParityError
from cellscan.mlops import registry
from cellscan.settings import Settings

logger = logging.getLogger(__name__)

REFUSED_RETRY_S = 600.0  # a champion whose export was refused: looked at again after this long


class ModelHolder:
    """The current champion, reloaded when the alias moves."""

    def __init__(self, settings: Settings, poll_seconds: float | None = None,
                 reachable: Callable[[], str | None] | None = None) -> None:
        self.settings = settings
        poll_seconds = settings.poll_seconds if poll_seconds is None else poll_seconds
        self._lock = threading.Lock()
        # held while the alias is read and the served model changes (a refresh, a rollback): neither loads
        # a version the other is installing, nor installs an older one after it
        self.changing = threading.Lock()
        self._model: CellscanModel | None = None
        self._version: int | None = None
        self.champion: int | None = None  # the alias as last read from the registry
        # (version, reason, when): the champion's export failed its parity check; not converted again at
        # every poll, only after REFUSED_RETRY_S (an export made meanwhile elsewhere is then picked up)
        self._refused: tuple[int, str, float] | None = None
        self.last_error: str | None = None
        # None when MLflow answers, else why not (cellscan.serve.health.TrackingProbe.error): the poll then
        # skips the registry, whose client would retry a refused connection for minutes.
        self.reachable = reachable
        self._stop = threading.Event()
        try:
            self.refresh()
        except Exception as exc:  # start anyway, serving nothing: /health says why, a rollback can mend it
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning("the champion could not be loaded: %s", self.last_error)
        if poll_seconds > 0:
            threading.Thread(target=self._poll, args=(poll_seconds,), daemon=True, name="champion-poll").start()

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            problem = self.reachable() if self.reachable is not None else None
            if problem is not None:
                self.last_error = problem
                continue
            try:
                self.refresh()
            except Exception as exc:  # keep serving the model we have
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("champion refresh failed: %s", self.last_error)

    def refresh(self) -> int | None:
        """Load the champion if the alias points elsewhere than the loaded version; returns the version.

        A version whose export was refused by its parity check (a deterministic failure) is prepared again
        only after ``REFUSED_RETRY_S`` or once the alias has moved: meanwhile ``last_error`` says why; other
        failures (the registry, a download) are tried again at the next poll."""
        with self.changing:
            version = registry.champion_version(self.settings)
            self.champion = version
            if version is None or version == self._version:
                return self._version
            if self._refused is not None and (version != self._refused[0]
                                              or time.monotonic() - self._refused[2] > REFUSED_RETRY_S):
                self._refused = None  # the alias moved, or time to look again
            if self._refused is not None:  # converting it again now would refuse it again
                self.last_error = self._refused[1]
                return self._version
            try:
                model = self.prepare(version)
            except ParityError as exc:
                self._refused = (version, f"{type(exc).__name__}: {exc}", time.monotonic())
                raise
            self.install(model, version)
            return version

    def prepare(self, version: int) -> CellscanModel:
        """Load ``version`` as it would serve (for ONNX or TFLite: its export); serve nothing yet."""
        model, _ = registry.load_model(version, self.settings)
        if self.settings.runtime != "keras":
            from cellscan.mlops.export import serving_model

            model = serving_model(self.settings, model, version, self.settings.runtime)
        return model

    def install(self, model: CellscanModel, version: int) -> None:
        """Serve ``model`` (made by :meth:`prepare`) as ``version`` from the next request on."""
        with self._lock:
            self._model, self._version = model, version
        self.champion = version
        self.last_error = None
        logger.info("serving champion version %s (%s)", version, self.settings.runtime)

    def current(self) -> tuple[CellscanModel, int]:
        with self._lock:
            model, version = self._model, self._version
        if model is None or version is None:
            msg = f"no champion of model {self.settings.model_name!r} is registered yet; train one first"
            raise NoModelError(msg)
        return model, version

    @property
    def version(self) -> int | None:
        return self._version

    def stop(self) -> None:
        self._stop.set()


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future[Any]
    model: tuple[CellscanModel, int] | None = None  # what it was prepared for; None: the current champion


class Batcher:
    """Adaptive batching: one model call for the requests that arrive within ``max_latency_ms``."""

    def __init__(self, holder: ModelHolder, max_batch: int = 32, max_latency_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None,
                 embed: Callable[[Any], np.ndarray] | None = None, workers: int = 1) -> None:
        """``workers``: batches scored at once. 1 for Keras (one graph call at a time); ONNX Runtime's
        session is thread-safe and releases the GIL, so a second worker runs the networks of one
        batch while the numpy scoring of another goes on."""
        self.holder = holder
        self.max_batch = max_batch
        self.max_latency = max_latency_ms / 1000
        self.on_batch = on_batch
        self.embed = embed  # ScoreResult -> (N, D): each record gets its row as "_embedding" (prediction log)
        self.workers = max(1, workers)
        self._queue: asyncio.Queue[_Item] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="score")
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    async def score(self, x: np.ndarray, model: tuple[CellscanModel, int] | None = None,
                    ) -> tuple[dict[str, Any], np.ndarray, int]:
        """Score one preprocessed image: (record, anomaly map, model version). ``model``: the (model,
        version) that prepared ``x`` (decoded it to its input size), so that a champion swapped in
        meanwhile, perhaps with another input size, never scores it; None: the champion at scoring time."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(x, fut, model))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.workers)
        while True:
            await self._slots.acquire()  # gather the next batch only when a worker is free for it
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_latency
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            task = loop.create_task(self._dispatch(items))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _dispatch(self, items: list[_Item]) -> None:
        assert self._slots is not None
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._score_batch, [i.x for i in items],
                                                 [i.model for i in items])
            for item, res in zip(items, results, strict=True):
                if not item.future.done():
                    item.future.set_result(res)
        except Exception as exc:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._slots.release()

    def _score_batch(self, xs: list[np.ndarray], models: list[tuple[CellscanModel, int] | None] | None = None,
                     ) -> list[tuple[dict[str, Any], np.ndarray, int]]:
        """One model call per model among the items (one, unless the champion changed while they queued)."""
        current = self.holder.current() if models is None or None in models else None
        pairs = [m or current for m in (models or [None] * len(xs))]
        groups: dict[int, list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault(id(pair[0]), []).append(i)  # type: ignore[index]
        out: list[Any] = [None] * len(xs)
        for idx in groups.values():
            model, version = pairs[idx[0]]  # type: ignore[misc]
            res = model.score_arrays(np.stack([xs[i] for i in idx]))
            if self.on_batch:
                self.on_batch(len(idx))
            emb = self.embed(res) if self.embed is not None else None
            for j, i in enumerate(idx):
                record = res.record(j) | ({} if emb is None else {"_embedding": emb[j]})
                out[i] = (record, res.maps[j], version)
        return out
