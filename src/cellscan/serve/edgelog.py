"""Results scored on an edge device (``cellscan-edge score --post URL``) as rows of the prediction log.

The body is what :func:`cellscan.edge.post_results` sends::

    {"source": "cellscan-edge", "host": "line-3", "model_version": 4, "runtime": "onnx",
     "records": [{"image": ..., "status": "ok", "is_anomaly": ..., "anomaly_score": ...,
                  "reconstruction_error": ..., "threshold": ..., "model_version": ..., "error": ..., "time": ...}]}

:func:`edge_rows` checks it whole before anything is written: a malformed record is an
:class:`~cellscan.errors.EdgeRecordsError` naming its index and field; records the device could not
score (``status: error``) are counted and skipped. Rows are marked ``source = "edge"`` and carry the
device's host in their batch id (``edge-<host>-<time>``), so the monitor sees them beside the
service's own predictions. Descriptors and embeddings stay empty: the device sends no pixels.
"""

from __future__ import annotations

import math
import time
from typing import Any

from cellscan.edge import FIELDS
from cellscan.errors import CellscanError

MAX_RECORDS = 1000  # per request; cellscan-edge sends 100
MAX_ABS = 1e12  # scores and thresholds beyond it are no scores (and would overflow the batch means)
EARLIEST = 1_577_836_800  # 2020-01-01 UTC: a record dated before it comes from a device whose clock is unset
BODY_KEYS = ("source", "host", "model_version", "runtime", "records")
RECORD_KEYS = (*FIELDS, "time")


class EdgeRecordsError(CellscanError):
    """A body of edge results that cannot be logged (HTTP 400)."""


def _fail(msg: str) -> EdgeRecordsError:
    return EdgeRecordsError(msg)


def _number(rec: dict[str, Any], key: str, where: str, *, optional: bool = False) -> float | None:
    value = rec.get(key)
    if value is None and optional:
        return None
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not number or abs(value) > MAX_ABS or not math.isfinite(value):  # size first: isfinite(10**400) fails
        msg = f"{where}.{key}: expected a finite number, at most {MAX_ABS:g} in size, got {str(value)[:40]!r}"
        raise _fail(msg)
    return float(value)


def _version(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        msg = f"{where}: expected a model version (an integer >= 1) or null, got {str(value)[:40]!r}"
        raise _fail(msg)
    return value


def edge_rows(body: Any, now: float | None = None, max_records: int = MAX_RECORDS) -> tuple[list[dict[str, Any]], int]:
    """Prediction-log rows from an edge body, and how many records were skipped (``status: error``).

    Raises:
        EdgeRecordsError: the body or one of its records is malformed (nothing is written then).
    """
    now = time.time() if now is None else now
    if not isinstance(body, dict):
        msg = f"expected a JSON object with records, got {type(body).__name__}"
        raise _fail(msg)
    unknown = sorted(set(body) - set(BODY_KEYS))
    if unknown:
        msg = f"unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; expected some of {', '.join(BODY_KEYS)}"
        raise _fail(msg)
    records = body.get("records")
    if not isinstance(records, list):
        msg = "records: expected a list of result rows (cellscan-edge's results.csv rows)"
        raise _fail(msg)
    if len(records) > max_records:
        msg = f"records: at most {max_records} per request, got {len(records)}; send them in chunks"
        raise _fail(msg)
    host = body.get("host") or "unknown"
    if not isinstance(host, str) or len(host) > 100:
        msg = "host: expected a name of at most 100 characters"
        raise _fail(msg)
    default_version = _version(body.get("model_version"), "model_version")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    batch = f"edge-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in host)[:16]}-{stamp}"
    rows, skipped = [], 0
    for i, rec in enumerate(records):
        where = f"records[{i}]"
        if not isinstance(rec, dict):
            msg = f"{where}: expected an object, got {type(rec).__name__}"
            raise _fail(msg)
        extra = sorted(set(rec) - set(RECORD_KEYS))
        if extra:
            msg = f"{where}: unknown field(s) {', '.join(repr(k[:40]) for k in extra[:5])}; expected some of {', '.join(RECORD_KEYS)}"
            raise _fail(msg)
        status = rec.get("status", "ok")
        if status not in ("ok", "error"):
            msg = f"{where}.status: expected 'ok' or 'error', got {str(status)[:40]!r}"
            raise _fail(msg)
        if status == "error":
            skipped += 1
            continue
        if not isinstance(rec.get("is_anomaly"), bool):
            msg = f"{where}.is_anomaly: expected true or false, got {str(rec.get('is_anomaly'))[:40]!r}"
            raise _fail(msg)
        ts = _number(rec, "time", where, optional=True)
        if ts is not None and not EARLIEST < ts <= now + 86400:
            msg = (f"{where}.time: expected a Unix time after 2020-01-01 and not in the future, got {ts} "
                   "(is the device's clock set?)")
            raise _fail(msg)
        ts = now if ts is None else ts
        score, threshold = _number(rec, "anomaly_score", where), _number(rec, "threshold", where)
        if rec["is_anomaly"] != (score > threshold):  # cellscan-edge decides in float64 on the floats it sends
            msg = (f"{where}.is_anomaly: {str(rec['is_anomaly']).lower()} contradicts anomaly_score {score:g} "
                   f"{'>' if score > threshold else '<='} threshold {threshold:g}; expected is_anomaly = "
                   "anomaly_score > threshold")
            raise _fail(msg)
        name = rec.get("image")
        if name is not None and not isinstance(name, str):
            msg = f"{where}.image: expected a file name"
            raise _fail(msg)
        rows.append({
            "ts": ts, "day": time.strftime("%Y-%m-%d", time.gmtime(ts)), "source": "edge", "batch_id": batch,
            "model_version": _version(rec.get("model_version"), f"{where}.model_version") or default_version,
            "name": (name or "")[-200:], "score": score,
            "recon_score": _number(rec, "reconstruction_error", where, optional=True),
            "threshold": threshold, "is_anomaly": rec["is_anomaly"],
        })
    return rows, skipped
