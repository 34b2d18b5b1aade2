"""The prediction log: one row per scored image, in any SQLAlchemy database (sqlite in the project by default).

Each row holds time, model version, source (``upload``, ``url``, ``batch``, ``cli``, ``edge``), batch id, content hash,
size and bit depth, the intensity descriptors and the compact embedding (:mod:`.descriptors`), score,
threshold, verdict and latency. The images themselves are kept (content-addressed, one folder per day)
for ``keep_days`` days; :meth:`PredictionLog.prune` removes older ones and clears their paths.

Writing never blocks a request: :class:`LogWriter` takes items on a queue and a background thread
computes the descriptors and inserts them in batches.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellscan.files import write_atomic
from cellscan.mlops.monitor.descriptors import DESCRIPTORS, EMBEDDING, content_hash, describe, header

if TYPE_CHECKING:
    import pandas as pd

    from cellscan.settings import Settings

logger = logging.getLogger(__name__)


def _tables() -> tuple[Any, Any, Any]:
    from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, Text

    md = MetaData()
    preds = Table(
        "predictions", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("ts", Float, index=True, nullable=False),
        Column("day", String(10), index=True, nullable=False),
        Column("model_version", Integer, index=True),
        Column("source", String(16), nullable=False),
        Column("batch_id", String(40), index=True),
        Column("name", String(200)),
        Column("content_hash", String(64), index=True),
        Column("height", Integer), Column("width", Integer), Column("bit_depth", Integer),
        *[Column(f"d_{k}", Float) for k in DESCRIPTORS],
        Column("embedding", Text),
        Column("score", Float), Column("recon_score", Float), Column("threshold", Float),
        Column("is_anomaly", Boolean), Column("latency_ms", Float),
        Column("image_path", String(400)),
    )
    alerts = Table(
        "alerts", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("ts", Float, index=True, nullable=False),
        Column("kind", String(40), index=True, nullable=False),
        Column("model_version", Integer),
        Column("emitted", Boolean, nullable=False),
        Column("detail", Text),
    )
    return md, preds, alerts


@dataclass
class Item:
    """What the service hands the writer for one image (descriptors are computed in the writer thread)."""

    x: np.ndarray  # (H, W, C) the working-size input
    data: bytes  # the encoded image as received
    record: dict[str, Any]  # is_anomaly, anomaly_score, reconstruction_error, threshold
    embedding: np.ndarray | None
    source: str
    name: str
    model_version: int | None
    latency_s: float
    batch_id: str | None = None
    ts: float = field(default_factory=time.time)


class PredictionLog:
    """The store: insert rows, read windows back as DataFrames, keep images with a retention, alerts."""

    def __init__(self, url: str, image_dir: Path | None = None, keep_days: float = 30.0) -> None:
        from sqlalchemy import create_engine, event

        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine = create_engine(url)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn: Any, _: Any) -> None:  # readers (the monitor flow) never block the service
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=5000")
                cur.close()
        self.metadata, self.predictions, self.alerts = _tables()
        self.metadata.create_all(self.engine)
        self.image_dir = image_dir
        self.keep_days = keep_days

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictionLog:
        return cls(settings.prediction_db, settings.monitor_dir / "images", settings.keep_images_days)

    # -- writing ---------------------------------------------------------------------------
    def _keep(self, data: bytes, digest: str, day: str) -> str | None:
        """Keep the image under its content hash; None where it is not kept. An image that cannot be
        stored (a full disk) is logged without it: its row, and the others of its batch, are still written."""
        if self.image_dir is None or self.keep_days <= 0:
            return None
        folder = self.image_dir / day
        target = folder / f"{digest[:24]}.img"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # beside, under a name of its own (two writers, one image), renamed in
                write_atomic(target, data, sync=False)  # a copy for inspection: no fsync per image
        except OSError as exc:
            logger.warning("prediction image not kept (%s): %s", target, exc)
            return None
        return str(target)

    def rows(self, items: list[Item]) -> list[dict[str, Any]]:
        """Build rows (descriptors of the whole list in one call)."""
        if not items:
            return []
        desc = describe(np.stack([i.x for i in items])) if len({i.x.shape for i in items}) == 1 else \
            np.concatenate([describe(i.x[None]) for i in items])
        out = []
        for item, d in zip(items, desc, strict=True):
            day = time.strftime("%Y-%m-%d", time.gmtime(item.ts))
            digest = content_hash(item.data)
            h, w, depth = header(item.data)
            r = item.record
            out.append({
                "ts": item.ts, "day": day, "model_version": item.model_version, "source": item.source,
                "batch_id": item.batch_id, "name": item.name[:200], "content_hash": digest,
                "height": h, "width": w, "bit_depth": depth,
                **{f"d_{k}": float(v) for k, v in zip(DESCRIPTORS, d, strict=True)},
                "embedding": None if item.embedding is None else json.dumps([round(float(v), 6) for v in item.embedding]),
                "score": float(r["anomaly_score"]), "recon_score": float(r.get("reconstruction_error", "nan")),
                "threshold": float(r["threshold"]), "is_anomaly": bool(r["is_anomaly"]),
                "latency_ms": 1000 * item.latency_s, "image_path": self._keep(item.data, digest, day),
            })
        return out

    def write(self, items: list[Item]) -> int:
        return self.insert(self.rows(items))

    def insert(self, rows: list[dict[str, Any]]) -> int:
        """Insert ready rows (column -> value; columns left out are NULL), in one transaction.

        The service's own predictions come through :meth:`write`; rows scored elsewhere (an edge
        device's ``cellscan-edge --post``, source ``edge``) come here, with no descriptors or image.
        """
        if rows:
            keys = set().union(*rows)
            with self.engine.begin() as conn:
                conn.execute(self.predictions.insert(), [dict.fromkeys(keys) | r for r in rows])
        return len(rows)

    # -- reading ---------------------------------------------------------------------------
    def frame(self, model_version: int | None = None, since: float | None = None,
              limit: int | None = None, with_pixels: bool = False) -> pd.DataFrame:
        """The newest rows (oldest first), embedding expanded into ``emb_0..``, descriptors without ``d_``.

        ``with_pixels``: only rows scored from pixels here (with descriptors and embedding), chosen before
        ``limit`` is applied, so that edge devices' rows (a score and a verdict only) never fill the window.
        """
        import pandas as pd
        from sqlalchemy import select

        t = self.predictions
        q = select(t).order_by(t.c.ts.desc(), t.c.id.desc())
        if model_version is not None:
            q = q.where(t.c.model_version == model_version)
        if since is not None:
            q = q.where(t.c.ts >= since)
        if with_pixels:
            q = q.where(t.c.embedding.is_not(None), *(t.c[f"d_{k}"].is_not(None) for k in DESCRIPTORS))
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            df = pd.DataFrame(conn.execute(q).mappings().all(), columns=[c.name for c in t.columns])
        df = df.iloc[::-1].reset_index(drop=True).rename(columns={f"d_{k}": k for k in DESCRIPTORS})
        emb = [json.loads(e) if isinstance(e, str) else [np.nan] * len(EMBEDDING) for e in df["embedding"]]
        df[list(EMBEDDING)] = pd.DataFrame(emb, columns=list(EMBEDDING), index=df.index) if emb else np.nan
        df["is_anomaly"] = df["is_anomaly"].astype(float)
        return df

    def count(self) -> int:
        from sqlalchemy import func, select

        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self.predictions)).scalar_one())

    # -- retention -------------------------------------------------------------------------
    def prune(self, now: float | None = None) -> int:
        """Delete kept images older than ``keep_days`` (and clear their paths); returns how many folders went."""
        from sqlalchemy import update

        if self.image_dir is None or not self.image_dir.is_dir():
            return 0
        cutoff = time.strftime("%Y-%m-%d", time.gmtime((now or time.time()) - self.keep_days * 86400))
        gone = 0
        for folder in sorted(p for p in self.image_dir.iterdir() if p.is_dir()):
            if folder.name < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                with self.engine.begin() as conn:
                    conn.execute(update(self.predictions).where(self.predictions.c.day == folder.name)
                                 .values(image_path=None))
                gone += 1
        return gone

    # -- alerts (the monitor's cooldown) ------------------------------------------------------
    def add_alert(self, kind: str, model_version: int | None, emitted: bool, detail: dict[str, Any],
                  ts: float | None = None) -> int:
        """Record an alert; returns its id (:meth:`not_emitted` undoes ``emitted``: its event not sent)."""
        with self.engine.begin() as conn:
            res = conn.execute(self.alerts.insert().values(
                ts=ts or time.time(), kind=kind, model_version=model_version, emitted=emitted,
                detail=json.dumps(detail, default=str)))
            return int(res.inserted_primary_key[0])

    def not_emitted(self, alert_id: int) -> None:
        """Mark an alert whose event could not be sent: it no longer arms the cooldown."""
        from sqlalchemy import update

        with self.engine.begin() as conn:
            conn.execute(update(self.alerts).where(self.alerts.c.id == alert_id).values(emitted=False))

    def last_emitted(self, kinds: tuple[str, ...]) -> float | None:
        """When an alert of one of ``kinds`` last went out as an event (None: never)."""
        last = self.last_emitted_alert(kinds)
        return None if last is None else last[0]

    def last_emitted_alert(self, kinds: tuple[str, ...]) -> tuple[float, int | None, dict[str, Any]] | None:
        """(time, model version, detail) of the newest alert of one of ``kinds`` that went out as an event."""
        from sqlalchemy import select

        a = self.alerts
        q = (select(a.c.ts, a.c.model_version, a.c.detail).where(a.c.kind.in_(kinds), a.c.emitted.is_(True))
             .order_by(a.c.ts.desc(), a.c.id.desc()).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        if row is None:
            return None
        try:
            detail = json.loads(row.detail) if row.detail else {}
        except ValueError:
            detail = {}
        return float(row.ts), row.model_version, detail if isinstance(detail, dict) else {}


class LogWriter:
    """A background thread that writes :class:`Item` s in batches; :meth:`submit` never blocks."""

    def __init__(self, log: PredictionLog, max_queue: int = 10_000, prune_every_s: float = 3600.0) -> None:
        self.log = log
        self._q: queue.Queue[Item | None] = queue.Queue(max_queue)
        self.dropped = 0
        self.written = 0
        self.errors = 0
        self._prune_every = prune_every_s
        self._thread = threading.Thread(target=self._run, daemon=True, name="prediction-log")
        self._thread.start()

    def submit(self, item: Item) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        last_prune = 0.0
        while True:
            first = self._q.get()
            items = [first]
            while len(items) < 256:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = any(i is None for i in items)
            batch = [i for i in items if i is not None]
            try:
                self.written += self.log.write(batch)
                if time.time() - last_prune > self._prune_every:
                    self.log.prune()
                    last_prune = time.time()
            except Exception as exc:  # noqa: BLE001 (the log must never take the service down)
                self.errors += len(batch)
                logger.warning("prediction log: %d rows not written: %s", len(batch), exc)
            for _ in items:
                self._q.task_done()
            if stop:
                return

    def flush(self) -> None:
        """Wait until everything submitted so far is written (tests, shutdown)."""
        self._q.join()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, for at most ``timeout`` seconds; what is left is said, not silently lost."""
        t0 = time.monotonic()
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout=max(0.0, timeout - (time.monotonic() - t0)))
        if self._thread.is_alive():
            logger.warning("prediction log: at least %d queued rows not written at shutdown (writing took "
                           "over %.1f s)", max(self._q.qsize() - 1, 0), timeout)
