"""Register cellscan's deployments with a running Prefect server (executed by a worker on ``pool``).

    prefect work-pool create cellscan --type process     (scripts/services.sh does this)
    python -m flows.deploy                                 (retrain nightly by default: params retrain.cron)

- ``retrain/scheduled-retrain``: on a schedule, retrain on the scans waiting in temp/ (skipped when
  there are none), then gate;
- ``retrain/service-retrain`` and ``evaluate-threshold/service-evaluate-threshold``: no schedule;
  the service starts a run of them for each /retrain and /anomaly when PREFECT_API_URL is set
  (cellscan.serve.jobs), so trainings run in the worker, never in the service;
- ``monitor/scheduled-monitor``: every ``monitor.interval_minutes``, the drift report (flows/monitor.py);
- ``retrain/drift-retrain``: no schedule; an event trigger starts it on ``cellscan.drift.detected`` or
  ``cellscan.anomaly-rate.jump`` (the monitor emits at most one per ``monitor.cooldown_minutes``).

Needs PREFECT_API_URL pointing at a real ``prefect server`` and a worker on the pool.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from datetime import timedelta
from typing import Any

from prefect import flow

from cellscan.core.config import cron_problem, load_params
from cellscan.errors import ConfigError, describe
from cellscan.mlops.monitor.check import DRIFT_EVENT, RATE_EVENT
from cellscan.serve.jobs import EVALUATE_DEPLOYMENT, RETRAIN_DEPLOYMENT
from cellscan.settings import setup_offline

REPO = Path(__file__).resolve().parent.parent
# The service reads a run's returned dict from its state: the worker's runs must persist results.
SERVICE_JOB_VARIABLES = {"env": {"PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true"}}


def _deploy(entrypoint: str, name: str, pool: str, parameters: dict[str, Any], description: str,
            cron: str | None = None, job_variables: dict[str, Any] | None = None,
            interval: timedelta | None = None, triggers: list[Any] | None = None) -> str:
    remote = flow.from_source(source=str(REPO), entrypoint=entrypoint)
    dep_id = remote.deploy(  # type: ignore[attr-defined]
        name=name,
        work_pool_name=pool,
        cron=cron,
        interval=interval,
        triggers=triggers,
        parameters=parameters,
        job_variables=job_variables,
        description=description,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return str(dep_id)


def check_server(pool: str) -> str:
    """The Prefect API deployments would go to, where it answers and holds ``pool``; else a ConfigError.
    Without PREFECT_API_URL Prefect would deploy to a temporary server that is gone when this command ends."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    if not api:
        msg = ("no Prefect server to deploy to: set PREFECT_API_URL to its API "
               "(scripts/services.sh start runs one at http://127.0.0.1:4200/api)")
        raise ConfigError(msg)
    try:
        with get_client(sync_client=True) as client:
            client.read_work_pool(pool)
    except ObjectNotFound:
        msg = (f"no work pool {pool!r} on the Prefect server at {api}: "
               f"prefect work-pool create {pool} --type process")
        raise ConfigError(msg) from None
    except Exception as exc:  # httpx's ConnectError, a timeout: the server does not answer
        if describe(exc) is not None:
            raise
        msg = f"the Prefect server at {api} does not answer ({type(exc).__name__}: {exc})"
        raise ConfigError(msg) from None
    return str(api)


def deploy(pool: str = "cellscan", cron: str | None = None, name: str = "scheduled-retrain",
           project: Path | str = REPO) -> dict[str, str]:
    """Create or update the deployments on ``pool``; returns their ids by full name."""
    from prefect.events import DeploymentEventTrigger

    setup_offline()
    project = str(Path(project).resolve())
    params = load_params(Path(project) / "params.yaml")
    cron = cron or params.retrain.cron
    if problem := cron_problem(cron):
        msg = f"--cron must be a cron expression with {problem}, got {cron!r}"
        raise ConfigError(msg)
    check_server(pool)  # before any deployment is made: all of them or none
    every = timedelta(minutes=params.monitor.interval_minutes)
    on_drift = DeploymentEventTrigger(
        name="retrain-on-drift", expect={DRIFT_EVENT, RATE_EVENT}, match={"prefect.resource.id": "cellscan.model.*"},
        parameters={"project": project, "require_new_images": False})
    ids = {
        f"retrain/{name}": _deploy(
            "flows/retrain.py:retrain_flow", name, pool, {"project": project, "require_new_images": True},
            "Retrain on the scans waiting in temp/ (skipped when there are none), then gate.", cron=cron),
        f"retrain/{RETRAIN_DEPLOYMENT}": _deploy(
            "flows/retrain.py:retrain_flow", RETRAIN_DEPLOYMENT, pool, {"project": project},
            "Started by the service's /retrain: take temp/ into training, retrain, gate.",
            job_variables=SERVICE_JOB_VARIABLES),
        f"evaluate-threshold/{EVALUATE_DEPLOYMENT}": _deploy(
            "flows/evaluate_threshold.py:evaluate_threshold_flow", EVALUATE_DEPLOYMENT, pool, {"project": project},
            "Started by the service's /anomaly: re-evaluate errors and threshold into a new version.",
            job_variables=SERVICE_JOB_VARIABLES),
        "monitor/scheduled-monitor": _deploy(
            "flows/monitor.py:monitor_flow", "scheduled-monitor", pool, {"project": project},
            "Drift report on the champion's newest predictions; events on drift or an anomaly-rate jump.",
            interval=every),
        "retrain/drift-retrain": _deploy(
            "flows/retrain.py:retrain_flow", "drift-retrain", pool, {"project": project},
            "Started by the monitor's drift / anomaly-rate events (event trigger; cooldown in the monitor).",
            triggers=[on_drift]),
    }
    for full, dep_id in ids.items():
        when = f", schedule {cron!r}" if full.endswith(name) else f", every {every}" if "monitor" in full else ""
        print(f"deployment {full} on pool {pool!r}{when}: {dep_id}")
    return ids


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="cellscan")
    ap.add_argument("--cron", default=None)
    ap.add_argument("--project", default=str(REPO), help="project folder the runs work on (default: the repo)")
    a = ap.parse_args()
    try:
        deploy(a.pool, a.cron, project=a.project)
    except Exception as exc:  # a missing server, pool or params file: one line, as the other flows say it
        said = describe(exc)
        if said is None:
            raise
        line = f"{said[0]}: {said[1]}"
        raise SystemExit(line) from None
