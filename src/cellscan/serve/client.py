"""Batch client: send a folder of images to a running cellscan service.

Each image is uploaded to ``/predict`` with up to 3 tries (backoff 0.5 s, 1 s) on connection
errors and 5xx/429 answers; other 4xx answers are final (the image is bad, retrying won't help).
Results go to ``results.csv``, every attempt to an events log (JSON lines), and the batch's metrics
(process time, time per prediction, mean score, anomaly rate, count per verdict) to ``metrics.json`` and
``metrics.prom`` (Prometheus text) next to ``results.csv``.
"""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cellscan.core.data import folder_images

RETRY_STATUS = {429, 500, 502, 503, 504}
FIELDS = ["image", "status", "is_anomaly", "anomaly_score", "reconstruction_error", "threshold", "model_version",
          "error", "attempts", "seconds"]


@dataclass
class BatchSummary:
    images: int
    ok: int
    failed: int
    anomalies: int
    seconds: float
    first_error: str = ""  # the first failed image's error, to say on the console (all are in the CSV)

    @property
    def per_prediction(self) -> float:
        return self.seconds / self.images if self.images else 0.0


def _predict_one(client: httpx.Client, url: str, path: Path, tries: int, log: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    row: dict[str, Any] = {"image": str(path)}
    for attempt in range(1, tries + 1):
        try:
            with path.open("rb") as fh:
                resp = client.post(f"{url}/predict", files={"image": (path.name, fh, "application/octet-stream")})
            event = {"image": str(path), "attempt": attempt, "status": resp.status_code, "time": time.time()}
            if resp.status_code == 200:
                row |= resp.json() | {"status": "ok"}
                log.write(json.dumps(event) + "\n")
                break
            body = resp.text[:300]
            event["error"] = body
            log.write(json.dumps(event) + "\n")
            row |= {"status": f"http {resp.status_code}", "error": body}
            if resp.status_code not in RETRY_STATUS:
                break
        except httpx.HTTPError as exc:
            log.write(json.dumps({"image": str(path), "attempt": attempt, "error": repr(exc), "time": time.time()}) + "\n")
            row |= {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        if attempt < tries:
            time.sleep(0.5 * 2 ** (attempt - 1))
    row["attempts"] = attempt
    row["seconds"] = round(time.perf_counter() - t0, 4)
    return row


def predict_folder(
    folder: Path, url: str, out_csv: Path, events: Path, *, tries: int = 3, workers: int = 4, timeout: float = 60.0,
    api_key: str | None = None,
) -> BatchSummary:
    """Score every image in ``folder`` (recursively) through the service; write CSV and events."""
    paths = folder_images(folder, must_hold_images=True)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    events.parent.mkdir(parents=True, exist_ok=True)
    headers = {"x-api-key": api_key} if api_key else {}
    t0 = time.perf_counter()
    with httpx.Client(timeout=timeout, headers=headers) as client, events.open("a") as log, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(lambda p: _predict_one(client, url.rstrip("/"), p, tries, log), paths))
    seconds = time.perf_counter() - t0
    with out_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    from cellscan.mlops.monitor.batches import summarise, write_metrics

    write_metrics(out_csv.parent, summarise(rows, seconds, f"client-{time.strftime('%Y%m%dT%H%M%S')}"))
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    first = f"{failed[0]['image']}: {failed[0].get('error', '')}" if failed else ""
    return BatchSummary(len(rows), len(ok), len(failed), sum(bool(r.get("is_anomaly")) for r in ok), seconds, first)
