"""A temporary git + DVC project with a sqlite MLflow store, and Prefect's test harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellscan.settings import Settings
from cellscan.mlops.versioning import init_project
from tests.conftest import tiny_params

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Prefect's test harness for one test module; afterwards the Prefect settings are as before."""
    before = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect"))
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = before


def make_project(root: Path, **overrides: object) -> Path:
    """A project folder: params.yaml, synthetic data/cells, git + DVC with a local remote."""
    return init_project(root, tiny_params(**overrides))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CELLSCAN_MODEL_NAME", raising=False)
    return make_project(tmp_path / "proj")


@pytest.fixture
def settings(project: Path) -> Settings:
    return Settings.from_env(project)
