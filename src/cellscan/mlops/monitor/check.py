"""One pass of the monitor: the champion's newest predictions against its reference.

:func:`check` reads the window from the prediction log, runs the Evidently report, saves it (latest.* is
what the service serves), logs it to MLflow, and decides which events go out: ``cellscan.drift.detected``
for drift and ``cellscan.anomaly-rate.jump`` for a jump of the anomaly rate, each at most once per
``monitor.cooldown_minutes`` (the retrain deployment is triggered by them; the cooldown stops a loop).
Emitting is the caller's job (the Prefect flow), so this stays testable without Prefect.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from cellscan.core.config import Params
from cellscan.mlops import registry
from cellscan.mlops.monitor.batches import batch_metrics, days_since
from cellscan.mlops.monitor.drift import log_to_mlflow, run_report, save_report, with_pixels
from cellscan.mlops.monitor.predlog import PredictionLog
from cellscan.mlops.monitor.reference import load_reference
from cellscan.settings import Settings

logger = logging.getLogger(__name__)

DRIFT_EVENT, RATE_EVENT = "cellscan.drift.detected", "cellscan.anomaly-rate.jump"


def check(settings: Settings, params: Params, version: int | None = None, now: float | None = None) -> dict[str, Any]:
    """Compare the newest ``monitor.window`` predictions of ``version`` (default: the champion) with its
    reference.

    For the champion, only predictions made since it took the alias count
    (:func:`~cellscan.mlops.registry.serving_since`): after a rollback, its rows from before the newer
    version served are not today's scans."""
    p = params.monitor
    now = now or time.time()
    champion = registry.champion_version(settings)
    version = version if version is not None else champion
    log = PredictionLog.from_settings(settings)
    pruned = log.prune(now)
    base = {"model_version": version, "pruned_image_days": pruned, "events": [], "report": None}
    if version is None:
        return base | {"status": "no champion"}
    # after a rollback: not its weeks-old rows from before (a version asked for by number: all its rows)
    since = registry.serving_since(settings) if version == champion else None
    window = log.frame(model_version=version, since=since, limit=p.window)  # every source: the batch metrics
    # the drift window: the newest rows with image descriptors (edge devices send a score and a verdict only)
    current = with_pixels(log.frame(model_version=version, since=since, limit=p.window, with_pixels=True))
    if len(current) < p.min_samples:
        took = "" if since is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(since))
        after = f" since it became the champion ({took})" if took else ""
        msg = (f"{len(current)} predictions of version {version} with image descriptors{after}, fewer than "
               f"{p.min_samples}")
        return base | {"status": msg}
    reference = load_reference(settings, version)
    snap, result = run_report(reference, current, p, version)
    allrows = log.frame(since=days_since(now, 7))
    extra = {"batches": batch_metrics(window), "days": batch_metrics(allrows, "day")}
    save_report(snap, result, settings.monitor_dir / "reports", extra)
    run_id = log_to_mlflow(settings, result)
    events = []
    newest = float(current["ts"].max())
    for kind, fired in ((DRIFT_EVENT, result.drift), (RATE_EVENT, result.rate_jump)):
        if not fired:
            continue
        last = log.last_emitted_alert((DRIFT_EVENT, RATE_EVENT))
        cooling = last is not None and now - last[0] < 60 * p.cooldown_minutes
        # An event needs new evidence: a line that stopped sending scans would otherwise trigger a retraining
        # on the same predictions after every cooldown (the gate keeping the champion each time).
        stale = (last is not None and last[1] == version
                 and float(last[2].get("newest_prediction", -math.inf)) >= newest)
        detail = {"columns": result.drifted, "anomaly_rate": result.anomaly_rate, "max_rate": result.max_rate,
                  "report": result.html, "mlflow_run": run_id, "newest_prediction": newest}
        alert = log.add_alert(kind, version, not (cooling or stale), detail, ts=now)
        if cooling:
            logger.warning("%s inside the cooldown (last event %.0f s ago): no event", kind, now - last[0])
        elif stale:
            logger.warning("%s on no prediction newer than the last event's: no event", kind)
        else:
            events.append({"event": kind, "payload": detail, "alert_id": alert})
    status = "drift" if result.drift else "anomaly-rate jump" if result.rate_jump else "no drift"
    return base | {"status": status, "drift": result.drift, "rate_jump": result.rate_jump,
                   "drifted": result.drifted, "anomaly_rate": result.anomaly_rate, "n": result.n_current,
                   "report": result.html, "report_json": result.json, "mlflow_run": run_id, "events": events,
                   "suppressed": [k for k, f in ((DRIFT_EVENT, result.drift), (RATE_EVENT, result.rate_jump))
                                  if f and k not in {e["event"] for e in events}]}


def event_not_sent(settings: Settings, event: dict[str, Any]) -> None:
    """An event of :func:`check` that could not be emitted: its alert no longer arms the cooldown, so the
    next check emits it again."""
    PredictionLog.from_settings(settings).not_emitted(int(event["alert_id"]))


def summary_line(out: dict[str, Any]) -> str:
    if "drift" not in out:
        return f"monitor: {out['status']}"
    cols = ", ".join(out["drifted"]) or "none"
    return (f"monitor v{out['model_version']}: {out['status']} on {out['n']} predictions; drifted columns: {cols}; "
            f"anomaly rate {out['anomaly_rate']:.3f}; report {out['report']}; events "
            f"{json.dumps([e['event'] for e in out['events']])}, suppressed by cooldown {out['suppressed']}")
