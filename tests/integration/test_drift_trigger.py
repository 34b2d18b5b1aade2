"""A real Prefect server: the drift event the monitor emits creates a run of ``retrain/drift-retrain``
through the deployment's event trigger (flows/deploy.py). No worker: the run stays scheduled."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.ports import free_port as _port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def prefect_server(tmp_path):  # type: ignore[no-untyped-def]
    port = _port()
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not start in 120 s")
        yield url, env
    finally:
        proc.terminate()
        proc.wait(30)


SCRIPT = r'''
import sys, time
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.events import emit_event
from flows.deploy import deploy
from cellscan.mlops.monitor.check import DRIFT_EVENT

ids = deploy(pool="cellscan-test", project=sys.argv[1])
dep = ids["retrain/drift-retrain"]
assert "monitor/scheduled-monitor" in ids

def runs():
    with get_client(sync_client=True) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep])))

assert runs() == []
time.sleep(3)  # the trigger is loaded by the server's automation service
emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": "cellscan.model.cellscan"},
           payload={"columns": ["mean", "sharpness"]})
for _ in range(90):
    got = runs()
    if got:
        break
    time.sleep(1)
print("RUNS", len(got), got[0].parameters if got else None)
with get_client(sync_client=True) as c:
    d = c.read_deployment(dep)
    m = c.read_deployment(ids["monitor/scheduled-monitor"])
print("SCHEDULE", [s.schedule for s in m.schedules])
'''


def test_drift_event_triggers_the_retrain_deployment(prefect_server, tmp_path):
    url, env = prefect_server
    from tests.integration.conftest import make_project

    project = make_project(tmp_path / "proj")
    env = env | {"PREFECT_API_URL": url}
    prefect = str(Path(sys.executable).parent / "prefect")
    subprocess.run([prefect, "work-pool", "create", "cellscan-test", "--type", "process"], env=env, check=True,
                   capture_output=True, timeout=120)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(project)], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RUNS 1 " in out.stdout and "'require_new_images': False" in out.stdout, out.stdout
    assert "interval=datetime.timedelta(seconds=3600)" in out.stdout, out.stdout
