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
