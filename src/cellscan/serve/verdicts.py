"""Operator verdicts on logged predictions, kept beside the prediction log (same database).

A verdict is one of:

- ``confirmed``: a flagged scan is a real defect (recorded only);
- ``false_alarm``: a flagged scan is normal; its image is stored as a new normal (role ``temp``, the
  folder ``/retrain`` stores into, through the same :func:`cellscan.mlops.steps.add_images`), so the
  next retraining learns from it;
- ``missed_defect``: a scan judged normal is a defect; its image is stored as a known anomaly and
  the threshold re-evaluation job runs (what ``/anomaly`` does).

Each verdict records when and by whom (the API key's name) and is given once per scan; an image whose
pixels are already in the dataset is never stored twice (the verdict is recorded with ``stored`` empty).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

VERDICTS = ("confirmed", "false_alarm", "missed_defect")
REVIEW_STATES = ("unreviewed", "reviewed", *VERDICTS)


def key_name(api_key: str | None, names: dict[str, str] | None = None) -> str:
    """Who acted: the key's configured name, else a fingerprint (never the key), else ``open-mode``."""
    if not api_key:
        return "open-mode"
    if names and api_key in names:
        return names[api_key]
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:8]


def _table(md: Any) -> Any:
    from sqlalchemy import Column, Float, Integer, String, Table, Text

    return Table(
        "verdicts", md,
        Column("prediction_id", Integer, primary_key=True),  # one verdict per scan
        Column("verdict", String(20), nullable=False),
        Column("ts", Float, nullable=False),
        Column("by", String(80), nullable=False),
        Column("stored", String(400)),  # where the image went in the dataset (None: recorded only / already there)
        Column("job_id", String(40)),
        Column("note", Text),
    )


class VerdictStore:
    """The ``verdicts`` table in the prediction log's database."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import MetaData

        self.engine = engine
        self.metadata = MetaData()
        self.table = _table(self.metadata)
        self.metadata.create_all(engine)

    def get(self, prediction_id: int) -> dict[str, Any] | None:
        from sqlalchemy import select

        with self.engine.connect() as conn:
            row = conn.execute(select(self.table).where(self.table.c.prediction_id == prediction_id)).mappings().first()
        return dict(row) if row else None

    def many(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        from sqlalchemy import select

        if not ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(select(self.table).where(self.table.c.prediction_id.in_(ids))).mappings().all()
        return {int(r["prediction_id"]): dict(r) for r in rows}

    def add(self, prediction_id: int, verdict: str, by: str, stored: str | None = None, job_id: str | None = None,
            note: str | None = None) -> dict[str, Any]:
        row = {"prediction_id": prediction_id, "verdict": verdict, "ts": time.time(), "by": by[:80],
               "stored": stored, "job_id": job_id, "note": note}
        with self.engine.begin() as conn:
            conn.execute(self.table.insert(), [row])
        return row


def check_verdict(verdict: str, is_anomaly: bool) -> str | None:
    """Why ``verdict`` does not apply to a scan judged ``is_anomaly`` (None: it applies)."""
    if verdict not in VERDICTS:
        return f"verdict must be one of: {', '.join(VERDICTS)}; got {verdict[:40]!r}"
    if verdict in ("confirmed", "false_alarm") and not is_anomaly:
        return f"{verdict} applies to a flagged scan; this one was judged normal (use missed_defect)"
    if verdict == "missed_defect" and is_anomaly:
        return "missed_defect applies to a scan judged normal; this one was flagged (use confirmed or false_alarm)"
    return None
