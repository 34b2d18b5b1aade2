"""Prefect flow: compare the champion's newest predictions with its reference (Evidently), emit events.

Deployed by flows/deploy.py on an interval (params ``monitor.interval_minutes``). On drift it emits
``cellscan.drift.detected``, on an anomaly-rate jump ``cellscan.anomaly-rate.jump`` (at most one per
``monitor.cooldown_minutes``); the ``retrain/drift-retrain`` deployment has an event trigger on them.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cellscan.mlops.monitor import check as monitor
from flows.common import context, main


@task(name="drift-report", retries=1, retry_delay_seconds=[10], cache_policy=NO_CACHE)
def drift_report(settings: Any, params: Any) -> dict[str, Any]:
    return monitor.check(settings, params)


@task(name="emit-events", cache_policy=NO_CACHE)
def emit(settings: Any, out: dict[str, Any]) -> list[str]:
    from prefect.events import emit_event

    from prefect.settings import get_current_settings

    ids = []
    for e in out["events"]:
        if not get_current_settings().api.url:  # a temporary server: its trigger is gone when the run ends
            print(f"{e['event']} not delivered: no Prefect server (PREFECT_API_URL unset), so no deployment "
                  "can be triggered by it; the next check run against a server sends it")
            monitor.event_not_sent(settings, e)
            ids.append("")
            continue
        try:
            ev = emit_event(event=e["event"],
                            resource={"prefect.resource.id": f"cellscan.model.{settings.model_name}",
                                      "prefect.resource.name": settings.model_name,
                                      "cellscan.model_version": str(out["model_version"])},
                            payload=e["payload"])
        except Exception as exc:  # the API gone: the event is sent by the next check, not lost for a cooldown
            print(f"{e['event']} could not be emitted ({type(exc).__name__}: {exc})")
            ev = None
        if ev is None:
            monitor.event_not_sent(settings, e)
        ids.append(str(ev.id) if ev else "")
    return ids


@flow(name="monitor", log_prints=True)
def monitor_flow(project: str = ".", params_path: str = "params.yaml") -> dict[str, Any]:
    """Drift report on the champion's newest predictions; events when it drifted or the anomaly rate jumped."""
    root, params, settings = context(project, params_path, None)
    out = drift_report(settings, params)
    out["event_ids"] = emit(settings, out) if out["events"] else []
    print(monitor.summary_line(out))
    return out


if __name__ == "__main__":
    raise SystemExit(main(monitor_flow, "Drift report on the champion's newest predictions."))
