"""Score a folder with a registered model: results.csv, batch metrics, an HTML summary with the flagged
images' heatmaps, and every prediction in the prediction log (source ``batch``).

Output folder::

    results.csv        image, status, is_anomaly, anomaly_score, reconstruction_error, threshold, model_version
                       (a stack, a multi-page TIFF of CT slices: one row per page, ``<path>#page=K``)
    metrics.json       the batch's metrics (process time, time per prediction, mean score, anomaly rate,
                       counts; ``not_logged``: rows the prediction log could not take, the results kept)
    metrics.prom       the same as Prometheus text
    summary.html       counts and a table of the flagged images with their heatmaps (inline PNG)
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cellscan.core.data import folder_images
from cellscan.core.images import iter_file_pages
from cellscan.errors import CellscanError, ConfigError
from cellscan.files import write_atomic
from cellscan.mlops import registry
from cellscan.mlops.monitor.batches import batch_metrics, summarise, write_metrics
from cellscan.mlops.monitor.descriptors import embed
from cellscan.mlops.monitor.predlog import Item, PredictionLog
from cellscan.settings import Settings

logger = logging.getLogger(__name__)

FIELDS = ["image", "status", "is_anomaly", "anomaly_score", "reconstruction_error", "threshold", "model_version",
          "error"]


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output path that is a file (results.csv and summary.html go in a folder)."""
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"{out_dir} is a file; expected a folder for results.csv and summary.html"
        raise ConfigError(msg)


def score_folder(settings: Settings, folder: Path, out_dir: Path, ref: int | str = "champion",
                 chunk: int = 32, log: bool = True, max_heatmaps: int = 50) -> dict[str, Any]:
    """Score every image under ``folder`` with ``ref``; write the output folder; returns the batch metrics."""
    from cellscan.core.plots import overlay_png

    check_out_dir(out_dir)  # said before minutes of scoring, not after
    model, version = registry.load_model(ref, settings)
    entries = iter_file_pages(folder_images(folder, must_hold_images=True))
    plog = PredictionLog.from_settings(settings) if log and settings.prediction_log else None
    batch_id = f"batch-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    rows: list[dict[str, Any]] = []
    flagged: list[tuple[str, bytes, dict[str, Any]]] = []
    items: list[Item] = []
    not_logged = 0  # rows the prediction log refused (a locked sqlite, a database restarting)
    t0 = time.perf_counter()
    while chunk_entries := list(itertools.islice(entries, chunk)):
        part, xs, natives, blobs = [], [], [], []
        for label, data in chunk_entries:
            try:
                if isinstance(data, Exception):
                    raise data
                x, native = model.load_pair(data, name=label)
            except (CellscanError, OSError) as exc:
                rows.append({"image": label, "status": "error", "error": str(exc)})
                continue
            part.append(label)
            xs.append(x)
            natives.append(native)
            blobs.append(data)
        if not part:
            continue
        t1 = time.perf_counter()
        res = model.score_arrays(np.stack(xs))
        emb = embed(res.recon, res.maps)
        each = (time.perf_counter() - t1) / len(part)
        for j, label in enumerate(part):
            rec = res.record(j)
            rows.append({"image": label, "status": "ok", **rec, "model_version": version})
            if plog is not None:
                items.append(Item(xs[j], blobs[j], rec, emb[j], "batch", Path(label).name, version, each, batch_id))
            if rec["is_anomaly"] and len(flagged) < max_heatmaps:
                flagged.append((label, overlay_png(natives[j], res.maps[j], rec["threshold"]), rec))
        if plog is not None:  # a chunk at a time: a stack of thousands of slices is not held to the end
            try:
                plog.write(items)
            except Exception as exc:  # noqa: BLE001 - the results come first; the log says what it missed
                not_logged += len(items)
                logger.warning("prediction log: %d rows of batch %s not written: %s", len(items), batch_id,
                               exc)
            items = []
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out_dir / "results.csv", table.getvalue())  # an earlier batch's stays whole until replaced
    metrics = summarise(rows, seconds, batch_id) | ({"not_logged": not_logged} if plog is not None else {})
    write_metrics(out_dir, metrics)
    write_atomic(out_dir / "summary.html", summary_html(folder, version, metrics, flagged))
    logger.info("scored %d images of %s with version %s: %d anomalies", len(rows), folder, version, metrics["anomaly"])
    return metrics | {"model_version": version, "out_dir": str(out_dir), "errors": metrics["failed"]}


def summary_html(folder: Path, version: int | None, m: dict[str, Any], flagged: list[tuple[str, bytes, dict[str, Any]]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(p))}</td><td>{r['anomaly_score']:.4g}</td>"
        f"<td><img width=256 src='data:image/png;base64,{base64.b64encode(png).decode()}'></td></tr>"
        for p, png, r in flagged)
    facts = "".join(f"<li>{k}: {v:.4g}</li>" if isinstance(v, float) else f"<li>{k}: {html.escape(str(v))}</li>"
                    for k, v in m.items())
    return (f"<!doctype html><html><head><meta charset=utf-8><title>cellscan batch {html.escape(m['key'])}</title>"
            f"</head><body><h1>{html.escape(str(folder))}: model version {version}</h1><ul>{facts}</ul>"
            f"<h2>Flagged images ({m['anomaly']})</h2><table border=1><tr><th>image</th><th>anomaly_score</th>"
            f"<th>heatmap</th></tr>{rows}</table></body></html>")


__all__ = ["score_folder", "summarise", "write_metrics", "batch_metrics"]
