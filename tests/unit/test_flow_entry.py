"""The flows' command lines answer a user's slip with one line and exit 1, before any flow run starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_wrong_project_is_one_line_and_no_flow_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.training", "--project", str(tmp_path / "nowhere")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().startswith("ConfigError: params file does not exist"), r.stderr
    assert "Traceback" not in r.stderr and "flow run" not in r.stderr.lower()


def test_score_folder_refuses_a_missing_or_empty_folder_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, needle in ((tmp_path / "nothere", "DatasetError: folder does not exist"),
                           (tmp_path / "empty", "DatasetError: no images under")):
        r = subprocess.run([sys.executable, "-m", "flows.score_folder", str(folder), "--project", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().startswith(needle) and "Traceback" not in r.stderr, r.stderr


def _dead_port() -> int:
    import socket

    with socket.socket() as s:  # bound and closed again: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_output_path_that_is_a_file_is_refused_before_scoring(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.png").write_bytes(b"not read before the output is checked")
    (tmp_path / "taken").write_text("an earlier report")
    cmd = [sys.executable, "-m", "flows.score_folder", "scans", "--out", "taken", "--project", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    expected = f"ConfigError: {tmp_path / 'taken'} is a file; expected a folder"
    assert r.stderr.strip().startswith(expected), r.stderr
    assert (tmp_path / "taken").read_text() == "an earlier report"


def test_a_tracking_server_that_does_not_answer_is_said_as_such(tmp_path):
    """Not "no champion": the store could not be read at all (a gate reading "none" would promote blind)."""
    import os
    import shutil

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    uri = f"http://127.0.0.1:{_dead_port()}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                        "PREFECT_HOME": str(tmp_path / "prefect")}
    r = subprocess.run([sys.executable, "-m", "flows.evaluate_threshold", "--project", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("TrackingError: ")]
    assert said, r.stderr[-2000:]
    assert said[-1].startswith(f"TrackingError: MLflow ({uri}) failed: "), r.stderr[-2000:]
    assert "no version or alias" not in r.stderr


def test_a_dvc_pull_that_fails_is_dvcs_reason_in_one_line(tmp_path):
    import os
    import shutil

    from cellscan.mlops.versioning import init_repo

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    init_repo(tmp_path, remote=tmp_path / "remote")
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")}
    r = subprocess.run([sys.executable, "-m", "flows.score_folder", "data/scans", "--dvc-target", "scans.dvc",
                        "--project", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("VersioningError: ")]
    assert said, r.stderr[-2000:]
    assert said[-1].startswith("VersioningError: `dvc pull scans.dvc` failed in "), r.stderr[-2000:]
    assert "scans.dvc' does not exist" in said[-1]
    assert "CalledProcessError" not in r.stderr


def test_deploy_says_in_one_line_that_there_is_no_server_to_deploy_to(tmp_path):
    """Without PREFECT_API_URL Prefect would deploy to a temporary server, gone when the command ends."""
    import os

    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path)}
    port = _dead_port()
    for env, needle in ((base, "ConfigError: no Prefect server to deploy to: set PREFECT_API_URL"),
                        (base | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
                         f"ConfigError: the Prefect server at http://127.0.0.1:{port}/api does not answer")):
        r = subprocess.run([sys.executable, "-m", "flows.deploy"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(needle), r.stderr[-2000:]
        assert "Traceback" not in r.stderr
