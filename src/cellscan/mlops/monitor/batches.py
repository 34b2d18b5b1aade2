"""The original batch service's metrics, per batch and per day: process time, time per prediction,
mean score, anomaly rate and the count per verdict; as rows and as Prometheus text."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellscan.files import write_atomic

if TYPE_CHECKING:
    import pandas as pd

FIELDS = ("key", "images", "anomaly", "normal", "anomaly_rate", "mean_score", "process_seconds",
          "ms_per_prediction", "first_ts", "last_ts")


def days_since(now: float, days: int) -> float:
    """The start (UTC midnight) of the oldest of the last ``days`` calendar days, today included: the per-day
    figures then hold whole days, not the tail of the oldest one."""
    midnight = now - now % 86400
    return midnight - 86400 * (max(1, days) - 1)


def _busy_seconds(g: pd.DataFrame) -> float:
    """Time spent scoring: the union of the batches' spans (first start to last end; a row outside any
    batch spans its own latency). The idle hours between requests are not processing, and requests served
    at the same time count once."""
    batched = g[g["batch_id"].notna()]
    spans = batched.groupby("batch_id").agg(first=("start", "min"), last=("ts", "max"))
    loose = g.loc[g["batch_id"].isna(), ["start", "ts"]].rename(columns={"start": "first", "ts": "last"})
    busy, end = 0.0, -math.inf
    firsts, lasts = [*spans["first"], *loose["first"]], [*spans["last"], *loose["last"]]
    for first, last in sorted(zip(firsts, lasts, strict=True)):
        if last > end:
            busy += last - max(first, end)
            end = last
    return float(busy)


def batch_metrics(df: pd.DataFrame, by: str = "batch_id") -> list[dict[str, Any]]:
    """One row per ``by`` (``batch_id`` or ``day``): the metrics in FIELDS.

    A batch's process time is from its first image's start (its time minus its latency) to its last one's
    end; a day's is the union of its batches' spans (:func:`_busy_seconds`).
    """
    out = []
    if df.empty:
        return out
    d = df.assign(start=df["ts"] - df["latency_ms"].fillna(0) / 1000, key=df[by].fillna("none"))
    for key, g in d.groupby("key", sort=False):
        n = len(g)
        anomalies = int(g["is_anomaly"].astype(bool).sum())
        span = float(g["ts"].max() - g["start"].min()) if by == "batch_id" else _busy_seconds(g)
        out.append({"key": str(key), "images": n, "anomaly": anomalies, "normal": n - anomalies,
                    "anomaly_rate": anomalies / n, "mean_score": float(g["score"].mean()),
                    "process_seconds": span, "ms_per_prediction": 1000 * span / n,
                    "first_ts": float(g["start"].min()), "last_ts": float(g["ts"].max())})
    return sorted(out, key=lambda r: r["first_ts"])


def prometheus_text(rows: list[dict[str, Any]], scope: str = "batch") -> str:
    """The rows as Prometheus exposition text (``cellscan_<scope>_...{<scope>="<key>"}``)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    g = {name: Gauge(f"cellscan_{scope}_{name}", help_, [scope], registry=reg) for name, help_ in (
        ("process_seconds", "Process time"), ("ms_per_prediction", "Time per prediction, ms"),
        ("mean_score", "Mean anomaly_score"), ("anomaly_rate", "Share of anomalies"))}
    count = Gauge(f"cellscan_{scope}_images", "Images per verdict", [scope, "verdict"], registry=reg)
    for r in rows:
        for name, gauge in g.items():
            gauge.labels(r["key"]).set(r[name])
        count.labels(r["key"], "anomaly").set(r["anomaly"])
        count.labels(r["key"], "normal").set(r["normal"])
    return generate_latest(reg).decode()


def summarise(rows: list[dict[str, Any]], seconds: float, key: str) -> dict[str, Any]:
    """The batch's metrics from its result rows and wall time."""
    ok = [r for r in rows if r.get("status") == "ok"]
    anomalies = sum(bool(r["is_anomaly"]) for r in ok)
    scores = [float(r["anomaly_score"]) for r in ok]
    return {"key": key, "images": len(rows), "scored": len(ok), "failed": len(rows) - len(ok),
            "anomaly": anomalies, "normal": len(ok) - anomalies,
            "anomaly_rate": anomalies / len(ok) if ok else 0.0,
            "mean_score": sum(scores) / len(scores) if scores else float("nan"),
            "process_seconds": seconds, "ms_per_prediction": 1000 * seconds / len(rows) if rows else 0.0,
            "day": time.strftime("%Y-%m-%d", time.gmtime())}


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    """metrics.json and metrics.prom next to results.csv."""
    strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    write_atomic(out_dir / "metrics.json", json.dumps(strict, indent=2, allow_nan=False))  # NaN: null
    write_atomic(out_dir / "metrics.prom", prometheus_text([metrics]))
