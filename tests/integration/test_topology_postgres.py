"""The compose stack's topology run for real without Docker (issue 13, part 3).

PostgreSQL from Debian's package (``initdb`` and ``pg_ctl`` in a temporary folder, on 127.0.0.1), the
MLflow server on it with artifacts served through the server, the Prefect server on it, a process work
pool with the deployments and a worker, the image server, and the service. Commands and environment
come from compose.yaml itself: only the in-network names (``postgres:5432``, ``http://mlflow:5000``, ...),
the volumes and the ports are swapped for local ones. What runs is what ``deploy/stack-setup.sh`` and
the stack do: the first training is a run of ``retrain/service-retrain`` executed by the worker; the
service serves the champion it fetches from the MLflow server over HTTP; ``/anomaly`` makes version 2
through the worker; ``/rollback`` moves the alias back; the prediction log lands in PostgreSQL.

Skips, with the reason, where PostgreSQL is not installed (Debian: ``apt-get install postgresql``;
.ci/run installs it when it can) or the MLflow server's driver (psycopg2, the dev extra) is missing.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from cellscan.core.images import encode_png
from tests.integration.conftest import REPO, make_project
from tests.integration.ports import free_port as _free_port
from tests.integration.test_service import _stop, _wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "topology-key"
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())  # raw: ${...} still in the strings


def _pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return cands[-1] if cands else None


def _interpolate(text: str, values: dict[str, str]) -> str:
    """compose's ${NAME}, ${NAME:-default} and ${NAME:?error}, from ``values`` only."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if values.get(name):
            return values[name]
        if op == ":?":
            pytest.fail(f"compose.yaml needs {name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{([A-Z0-9_]+)(:[-?])?([^}]*)\}", one, text)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


class Postgres:
    """A PostgreSQL server of its own in a temporary folder (as the ``postgres`` user when we are root)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql): "
                        "the compose topology is not run for real")
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            if shutil.which("runuser") is None or subprocess.run(["id", "-u", "postgres"],
                                                                 capture_output=True, check=False).returncode:
                pytest.skip("running as root without a postgres user (or runuser): initdb cannot run")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        # Not under pytest's tmp folder: its parents are private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="cellscan-pg-"))
        self.password = secrets.token_hex(12)
        self.port = _free_port()
        self.data = self.root / "data"

    def start(self) -> None:
        (self.root / "pwfile").write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.root / "pwfile", "postgres")
        self._run(self.initdb, "-D", str(self.data), "-U", "cellscan", f"--pwfile={self.root / 'pwfile'}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions")
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "120",
                  "-o", f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1", "start")

    def _run(self, *cmd: str) -> None:
        res = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=180, check=False)
        if res.returncode:
            log = self.root / "server.log"
            pytest.fail(f"{Path(cmd[0]).name} failed: {res.stderr[-2000:]} "
                        f"{log.read_text()[-2000:] if log.exists() else ''}")

    def url(self, db: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://cellscan:{self.password}@127.0.0.1:{self.port}/{db}"

    def sql(self, db: str, statement: str) -> list[tuple[Any, ...]]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(db), isolation_level="AUTOCOMMIT")  # CREATE DATABASE needs it
        try:
            with engine.begin() as conn:
                res = conn.execute(text(statement))
                return [tuple(r) for r in res] if res.returns_rows else []
        finally:
            engine.dispose()

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.pg_ctl), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _new_image(path: Path, shift: int) -> bytes:
    """A dataset image rolled by ``shift`` rows: new pixels (/anomaly refuses copies of stored images)."""
    return encode_png(np.roll(np.asarray(Image.open(path)), shift, axis=0) / 255.0)


def _wait_flow_run(api: str, run_id: str, seconds: int = 600) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} not finished in {seconds} s (state {run['state_type']})")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    try:
        import psycopg2  # noqa: F401  (the MLflow server's driver, and ours to query)
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install -e '.[dev]'): no MLflow server on PostgreSQL")
    pg = Postgres()
    root = tmp_path_factory.mktemp("topology")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pg.start()
        # The databases: the postgres image's POSTGRES_DB, then deploy/postgres/init-databases.sql.
        pg.sql("postgres", f"CREATE DATABASE {COMPOSE['services']['postgres']['environment']['POSTGRES_DB']}")
        for statement in (REPO / "deploy/postgres/init-databases.sql").read_text().split(";"):
            lines = [ln for ln in statement.splitlines() if ln.strip() and not ln.strip().startswith("--")]
            if lines:
                pg.sql("postgres", "\n".join(lines))

        ports = {name: _free_port() for name in ("mlflow", "prefect", "service", "images", "worker")}
        project = make_project(root / "proj", **{"retrain.epochs": 1})
        images = root / "images"
        images.mkdir()
        local = {  # in-network name or volume -> here
            "@postgres:5432/": f"@127.0.0.1:{pg.port}/",
            "http://mlflow:5000": f"http://127.0.0.1:{ports['mlflow']}",
            "http://prefect:4200": f"http://127.0.0.1:{ports['prefect']}",
            "images:8000": f"127.0.0.1:{ports['images']}",
            "/srv/cellscan": str(project),
            "/srv/prefect-results": str(root / "prefect-results"),
            "/srv/dvc-remote": str(root / "dvc-remote"),
            "/srv/mlflow-artifacts": str(root / "mlflow-artifacts"),
            "/srv/images": str(images),
        }
        values = {"POSTGRES_PASSWORD": pg.password, "CELLSCAN_API_KEY": KEY}

        def here(value: Any) -> str:
            out = _interpolate(str(value), values)
            for old, new in local.items():
                out = out.replace(old, new)
            return out

        def command(service: str, port: int) -> list[str]:
            cmd = [here(c) for c in COMPOSE["services"][service]["command"]]
            cmd = ["127.0.0.1" if c == "0.0.0.0" else c for c in cmd]
            for i, c in enumerate(cmd[:-1]):
                if c == "--port":
                    cmd[i + 1] = str(port)
            return [str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0], *cmd[1:]]

        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("CELLSCAN_", "MLFLOW_TRACKING", "PREFECT_API", "PREFECT_HOME"))}
        base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

        def env(service: str, **extra: str) -> dict[str, str]:
            own = {k: here(v) for k, v in (COMPOSE["services"][service].get("environment") or {}).items()}
            return base | own | {"PREFECT_HOME": str(root / f"prefect-home-{service}")} | extra

        # MLflow and Prefect servers on PostgreSQL, with compose's commands.
        log = root / "mlflow.log"
        procs.append(_start(command("mlflow", ports["mlflow"]), env("mlflow"), log))
        mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
        log_p = root / "prefect.log"
        procs.append(_start(command("prefect", ports["prefect"]), env("prefect"), log_p))
        _wait_http(f"{mlflow_url}/health", procs[0], log, seconds=240)
        api = f"http://127.0.0.1:{ports['prefect']}/api"
        _wait_http(f"{api}/health", procs[1], log_p, seconds=240)

        # deploy/stack-setup.sh's steps on the tiny project: the work pool, the deployments, a first training.
        setup_env = env("setup")
        pool = setup_env["CELLSCAN_WORK_POOL"]
        pool_type = setup_env["CELLSCAN_WORK_POOL_TYPE"]
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", pool_type],
                       cwd=REPO, env=setup_env, check=True, capture_output=True, timeout=180)
        subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", pool, "--project", str(project)],
                       cwd=REPO, env=setup_env, check=True, capture_output=True, timeout=300)
        log_w = root / "worker.log"
        procs.append(_start(command("worker", ports["worker"]),
                            env("worker", PREFECT_WORKER_WEBSERVER_PORT=str(ports["worker"]),
                                PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1"), log_w))
        _wait_http(f"http://127.0.0.1:{ports['worker']}/health", procs[-1], log_w, seconds=240)
        dep = httpx.get(f"{api}/deployments/name/retrain/service-retrain", timeout=10).json()
        first = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={}, timeout=10).json()
        first = _wait_flow_run(api, first["id"])
        assert first["state_type"] == "COMPLETED", f"{first['state_name']}: {log_w.read_text()[-3000:]}"

        # The image server (compose's `images`) and the service, with compose's environment.
        cmd = [str(ports["images"]) if c == "8000" else c for c in command("images", ports["images"])]
        procs.append(_start(cmd, base, root / "images.log"))
        svc_env = env("service", CELLSCAN_POLL_SECONDS="2")
        log_s = root / "service.log"
        procs.append(_start([str(BIN / "bentoml"), "serve", "service.service:Cellscan", "--host", "127.0.0.1",
                             "--port", str(ports["service"])], svc_env, log_s))
        _wait_http(f"http://127.0.0.1:{ports['service']}/readyz", procs[-1], log_s, seconds=300)
        yield {"pg": pg, "root": root, "project": project, "images": images, "api": api, "mlflow": mlflow_url,
               "base": f"http://127.0.0.1:{ports['service']}", "first_run": first, "env": svc_env,
               "files": f"http://127.0.0.1:{ports['images']}", "ports": ports}
    finally:
        for proc in reversed(procs):
            _stop(proc)
        pg.stop()


def _champion(stack: dict[str, Any]) -> int:
    """The champion alias, read from the MLflow server's REST API."""
    r = httpx.get(f"{stack['mlflow']}/api/2.0/mlflow/registered-models/alias",
                  params={"name": "cellscan", "alias": "champion"}, timeout=10)
    r.raise_for_status()
    return int(r.json()["model_version"]["version"])


def test_the_whole_topology_on_postgresql(stack: dict[str, Any]) -> None:
    pg, project, api = stack["pg"], stack["project"], stack["api"]
    # The first training ran through the worker, as a run of the deployment stack-setup.sh queues.
    first = stack["first_run"]
    dep = httpx.get(f"{api}/deployments/{first['deployment_id']}", timeout=10).json()
    assert dep["name"] == "service-retrain" and first["parameters"]["project"] == str(project)
    assert _champion(stack) == 1

    void = sorted((project / "data/cells/test/void").glob("*.png"))[0]
    shutil.copy(void, stack["images"] / "scan-1.png")
    good = sorted((project / "data/cells/test/good").glob("*.png"))[0]
    scan = {"image_url": f"{stack['files']}/scan-1.png"}
    with httpx.Client(base_url=stack["base"], timeout=600, headers={"x-api-key": KEY}) as c:
        # The service fetched the champion from the MLflow server; it predicts by URL (the allow-listed
        # image server) and from an upload.
        assert c.get("/health").json()["model_version"] == 1
        one = c.post("/predict", json=scan)
        assert one.status_code == 200, one.text
        one = one.json()
        assert one["model_version"] == 1 and one["is_anomaly"] == (one["anomaly_score"] > one["threshold"])
        up = c.post("/predict", files={"image": (good.name, good.read_bytes(), "image/png")}).json()
        assert up["model_version"] == 1 and isinstance(up["is_anomaly"], bool)
        # Every other private address stays refused (here: the MLflow server).
        r = c.post("/predict", json={"image_url": f"{stack['mlflow']}/health"})
        assert r.status_code == 400 and "non-public address" in r.text

        # A known anomaly: the service starts evaluate-threshold on the worker, version 2 becomes champion.
        crack = sorted((project / "data/cells/test/crack").glob("*.png"))[0]
        r = c.post("/anomaly", files={"image": ("crack-new.png", _new_image(crack, 3), "image/png")},
                   data={"defect": "crack"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == 2 and body["promoted"], body
        run = httpx.get(f"{api}/flow_runs/{body['flow_run_id']}", timeout=10).json()
        assert run["state_type"] == "COMPLETED"
        assert httpx.get(f"{api}/deployments/{run['deployment_id']}", timeout=10).json()["name"] == \
            "service-evaluate-threshold"
        assert _champion(stack) == 2
        assert c.post("/predict", json=scan).json()["model_version"] == 2

        # Rollback needs the key; with it the alias moves back in MLflow and the service follows.
        assert c.post("/rollback", json={}, headers={"x-api-key": "wrong"}).status_code in (401, 403)
        assert _champion(stack) == 2
        r = c.post("/rollback", json={})
        assert r.status_code == 200, r.text
        assert r.json() == {"champion": 1, "serving": 1}
        assert _champion(stack) == 1
        assert c.post("/predict", json=scan).json()["model_version"] == 1

    # The stores are PostgreSQL's, nothing fell back to the embedded sqlite defaults.
    aliases = pg.sql("mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = 'cellscan'")
    assert aliases == [("champion", 1)]
    versions = pg.sql("mlflow", "SELECT version FROM model_versions WHERE name = 'cellscan' ORDER BY version")
    assert versions == [(1,), (2,)]
    (uri,) = pg.sql("mlflow", "SELECT artifact_uri FROM runs WHERE run_uuid = "
                              "(SELECT run_id FROM model_versions WHERE name = 'cellscan' AND version = 1)")[0]
    assert uri.startswith("mlflow-artifacts:/"), uri  # artifacts went through the server
    assert any((stack["root"] / "mlflow-artifacts").rglob("model.keras"))
    done = pg.sql("prefect", "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")[0][0]
    assert done >= 2
    assert not (project / "mlflow" / "mlflow.db").exists()

    # The prediction log: the service's rows, in PostgreSQL (written by a background thread: wait a little).
    db = COMPOSE["services"]["postgres"]["environment"]["POSTGRES_DB"]
    assert stack["env"]["CELLSCAN_PREDICTION_DB"] == pg.url(db)
    rows: list[tuple[Any, ...]] = []
    for _ in range(30):
        rows = pg.sql(db, "SELECT model_version, source, is_anomaly, score FROM predictions ORDER BY id")
        if len(rows) >= 4:
            break
        time.sleep(1)
    assert [(v, s) for v, s, *_ in rows] == [(1, "url"), (1, "upload"), (2, "url"), (1, "url")]
    assert rows[0][2] == one["is_anomaly"] and rows[0][3] == pytest.approx(one["anomaly_score"], rel=1e-5)
    assert not (project / "monitoring" / "predictions.db").exists()
    page = httpx.get(f"{stack['base']}/ui/monitoring", headers={"x-api-key": KEY}, timeout=60)
    assert page.status_code == 200, page.text[-2000:]  # the daily anomaly rate, summed in PostgreSQL
    assert pg.sql(db, "SELECT day FROM predictions ORDER BY id DESC LIMIT 1")[0][0] in page.text
