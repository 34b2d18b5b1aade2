"""Register the scheduled retraining deployment with a running Prefect server.

    prefect work-pool create cellscan --type process     (scripts/services.sh does this)
    python -m flows.deploy                                 nightly by default (params: retrain.cron)

Needs PREFECT_API_URL pointing at a real ``prefect server`` and a worker on the pool.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from cellscan.core.config import load_params
from cellscan.settings import setup_offline

REPO = Path(__file__).resolve().parent.parent


def deploy(pool: str = "cellscan", cron: str | None = None, name: str = "scheduled-retrain") -> str:
    """Create or update the retrain deployment on ``pool`` with ``cron`` (default: params retrain.cron)."""
    setup_offline()
    cron = cron or load_params(REPO / "params.yaml").retrain.cron
    remote = flow.from_source(source=str(REPO), entrypoint="flows/retrain.py:retrain_flow")
    dep_id = remote.deploy(  # type: ignore[attr-defined]
        name=name,
        work_pool_name=pool,
        cron=cron,
        parameters={"project": str(REPO), "require_new_images": True},
        description="Retrain on the scans waiting in temp/ (skipped when there are none), then gate.",
        print_next_steps=False,
        ignore_warnings=True,
    )
    print(f"deployment retrain/{name} on pool {pool!r}, schedule {cron!r}: {dep_id}")
    return str(dep_id)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pool", default="cellscan")
    ap.add_argument("--cron", default=None)
    a = ap.parse_args()
    deploy(a.pool, a.cron)
