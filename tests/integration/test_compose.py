"""compose.yaml and the Dockerfile, checked offline with ``docker-compose config`` (nothing is built).

The compose tests skip, with the reason, where ``docker-compose`` is not installed (Debian:
``apt-get install docker-compose``; .ci/run installs it when it can).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_BIN = shutil.which("docker-compose")
REQUIRED = {"CELLSCAN_API_KEY": "test-key", "POSTGRES_PASSWORD": "test-password"}
OFFLINE = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "BENTOML_DO_NOT_TRACK",
           "PREFECT_SERVER_ANALYTICS_ENABLED", "DVC_NO_ANALYTICS")

NO_COMPOSE = ("docker-compose is not installed (Debian: apt-get install docker-compose); "
              "compose.yaml is not validated")

pytestmark = pytest.mark.integration


def compose(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """docker-compose on compose.yaml, interpolating exactly ``env`` (no .env file, no caller's keys)."""
    if COMPOSE_BIN is None:
        pytest.skip(NO_COMPOSE)
    empty = tmp_path / "empty.env"
    empty.write_text("")
    clean = {k: v for k, v in os.environ.items()
             if k not in REQUIRED and not k.startswith(("COMPOSE_", "CELLSCAN_", "DOCKER_"))}
    return subprocess.run([str(COMPOSE_BIN), "--env-file", str(empty), "-f", str(COMPOSE), *args],
                          cwd=REPO, env=clean | env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    res = compose(tmp_path_factory.mktemp("compose"), "config", **REQUIRED)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def ours(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the image this repository builds."""
    return {name: svc for name, svc in config["services"].items() if "build" in svc}


def test_compose_file_is_valid(tmp_path: Path) -> None:
    res = compose(tmp_path, "config", "-q", **REQUIRED)
    assert res.returncode == 0, res.stderr


def test_the_stack_has_its_parts(config: dict[str, Any]) -> None:
    services = config["services"]
    assert {"postgres", "mlflow", "prefect", "setup", "worker", "service", "images"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:15")
    mlflow = " ".join(services["mlflow"]["command"])
    assert "postgresql+psycopg2://" in mlflow
    assert "@postgres:5432/mlflow" in mlflow
    assert "--artifacts-destination" in mlflow
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    assert "--pool cellscan" in " ".join(services["worker"]["command"])
    assert set(config["volumes"]) >= {"pgdata", "mlflow-artifacts", "project-data", "dvc-remote"}
    for name in ("setup", "worker", "service"):
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["PREFECT_API_URL"] == "http://prefect:4200/api"
        assert env["CELLSCAN_HOME"] == "/srv/cellscan"


def test_every_long_running_service_has_a_healthcheck(config: dict[str, Any]) -> None:
    for name, svc in config["services"].items():
        if svc.get("restart") == "no":  # the one-shot setup
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test"), f"service {name} has no healthcheck"
        assert not check.get("disable"), f"service {name} disables its healthcheck"


def test_start_order_waits_for_health(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in ("worker", "service"):
        deps = services[name]["depends_on"]
        assert deps["setup"]["condition"] == "service_completed_successfully", name
        assert deps["mlflow"]["condition"] == "service_healthy", name
        assert deps["prefect"]["condition"] == "service_healthy", name
    for name in ("mlflow", "prefect"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_allowlist_names_the_image_server_and_nothing_wider(config: dict[str, Any]) -> None:
    services = config["services"]
    allow = [a.strip() for a in services["service"]["environment"]["CELLSCAN_URL_ALLOWLIST"].split(",")]
    command = [str(c) for c in services["images"]["command"]]
    port = next(c for c in command if c.isdigit())
    assert allow == [f"images:{port}"]
    assert not any("/" in a or "*" in a for a in allow), "a CIDR or wildcard would open other private hosts"


def test_api_key_is_required(tmp_path: Path) -> None:
    res = compose(tmp_path, "config", "-q", POSTGRES_PASSWORD="p")
    assert res.returncode != 0
    assert "CELLSCAN_API_KEY" in res.stderr


def test_no_service_of_our_image_runs_as_root(config: dict[str, Any]) -> None:
    final = DOCKERFILE.read_text().split("\nFROM ")[-1]  # the final stage
    users = re.findall(r"^USER\s+(\S+)", final, flags=re.MULTILINE)
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    for name, svc in ours(config).items():
        assert str(svc.get("user", "")).split(":")[0] not in ("root", "0"), f"service {name} runs as root"


def test_host_ports_are_loopback_only(config: dict[str, Any]) -> None:
    for name, svc in config["services"].items():
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"service {name} publishes {port} beyond loopback"
    assert "ports" not in config["services"]["postgres"]
    assert "ports" not in config["services"]["images"]


def test_client_backends_reach_the_service_and_the_image_store_only(config: dict[str, Any]) -> None:
    """The network backends join (``cellscan``) holds no part without authentication of its own."""
    joined = {name for name, svc in config["services"].items() if "clients" in (svc.get("networks") or {})}
    assert config["networks"]["clients"]["name"] == "cellscan"
    assert joined == {"service", "images"}
    assert config["networks"]["default"]["name"] != "cellscan"
    for name in ("mlflow", "prefect", "postgres", "worker"):  # reachable by the service, not by clients
        assert "clients" not in (config["services"][name].get("networks") or {"default": None}), name


def test_telemetry_off_everywhere(config: dict[str, Any]) -> None:
    for name, svc in ours(config).items():
        env = svc.get("environment") or {}
        missing = [k for k in OFFLINE if k not in env]
        assert not missing, f"service {name} lacks {missing}"


def test_dockerfile_is_multistage_with_healthcheck_and_pinned_deps() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.MULTILINE)) >= 2
    final = text.split("\nFROM ")[-1]
    assert "COPY --from=builder /opt/venv" in final
    assert "HEALTHCHECK" in final
    assert "/readyz" in final
    tools = re.search(r"\b(gcc|build-essential|uv pip|pip install)\b", final)
    assert tools is None, "build tools in the final stage"
    assert "--require-hashes -r deploy/requirements.lock" in text
    lock = (REPO / "deploy" / "requirements.lock").read_text()
    for pin in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        assert re.search(rf"^{re.escape(pin)}\s", lock, flags=re.MULTILINE | re.IGNORECASE), \
            f"{pin} (pyproject.toml) is not what deploy/requirements.lock pins: regenerate the lock"
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", "mlflow/", "data/", "dvc-remote/", "runs/", "models/"):
        assert path in ignored, f".dockerignore lets {path} into the build context"
