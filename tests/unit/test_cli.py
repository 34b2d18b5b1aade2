from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cellscan.cli import app

runner = CliRunner()


def _params_file(tmp_path, params):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(params.to_dict()))
    return f


def test_synth_writes_a_dataset(tmp_path, params):
    pf = _params_file(tmp_path, params)
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "d"), "-p", str(pf), "--json"])
    assert res.exit_code == 0, res.output
    counts = json.loads(res.stdout)["counts"]
    assert counts["train/good"] == params.synth.n_train


def test_evaluate_and_predict_json(trained, model_dir, dataset_dir, tmp_path, params):
    pf = _params_file(tmp_path, params)
    res = runner.invoke(app, ["evaluate", "-m", str(model_dir), "-d", str(dataset_dir), "-p", str(pf), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["image_auroc"] == trained.evaluation.metrics["image_auroc"]
    sizes = metrics["by_area"]  # the synthetic defects are marked: each counted once, in its size band
    assert sum(band["n"] for band in sizes.values()) == metrics["n_anomaly"] and sizes
    assert all(0.0 <= band["image_auroc"] <= 1.0 for band in sizes.values())

    img = next((dataset_dir / "test" / "void").glob("*.png"))
    res = runner.invoke(app, ["predict", str(img), "-m", str(model_dir), "--json", "--heatmaps", str(tmp_path / "h")])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["reconstruction_error"] > 0 and isinstance(row["is_anomaly"], bool)
    assert (tmp_path / "h" / f"{img.stem}_heatmap.png").stat().st_size > 100


def test_predict_table_output(model_dir, dataset_dir, trained):
    img = next((dataset_dir / "test" / "good").glob("*.png"))
    res = runner.invoke(app, ["predict", str(img), "-m", str(model_dir)])
    assert res.exit_code == 0 and "reconstruction_error" in res.stdout


def test_bad_input_exits_1_with_the_error_type(tmp_path, model_dir, trained):
    bad = tmp_path / "x.png"
    bad.write_text("not a png")
    res = runner.invoke(app, ["predict", str(bad), "-m", str(model_dir)])
    assert res.exit_code == 1
    assert "ImageError" in res.output and "not an image" in res.output


def test_bad_override_exits_1(tmp_path):
    res = runner.invoke(app, ["synth", "--set", "synth.size=8", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "synth.size must be between 32 and 2048" in res.output


def test_synth_never_writes_into_a_folder_that_holds_files(tmp_path, params):
    pf = _params_file(tmp_path, params)
    data = tmp_path / "d"
    data.mkdir()
    (data / "mine.png").write_bytes(b"keep")
    res = runner.invoke(app, ["synth", "--out", str(data), "-p", str(pf)])
    assert res.exit_code == 1 and "already holds files" in res.output and "--force" in res.output
    assert (data / "mine.png").read_bytes() == b"keep"
    res = runner.invoke(app, ["synth", "--out", str(data / "mine.png"), "-p", str(pf)])
    assert res.exit_code == 1 and "is a file; expected a folder" in res.output
    res = runner.invoke(app, ["synth", "--out", str(data), "-p", str(pf), "--force", "--json"])
    assert res.exit_code == 0, res.output
    assert not (data / "mine.png").exists() and (data / "train" / "good").is_dir()  # replaced, not mixed


def test_synth_refuses_to_replace_the_folder_one_works_in(tmp_path, params, monkeypatch):
    pf = _params_file(tmp_path, params)
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        res = runner.invoke(app, ["synth", "--out", out, "-p", str(pf), "--force"])
        assert res.exit_code == 1, res.output
        assert "holds the current folder" in res.output
        assert "Traceback" not in res.output
    assert (work / "mine.txt").read_text() == "keep"
    empty = tmp_path / "cells"  # an empty current folder is simply written into
    empty.mkdir()
    monkeypatch.chdir(empty)
    res = runner.invoke(app, ["synth", "--out", ".", "-p", str(pf)])
    assert res.exit_code == 0, res.output
    assert (empty / "train" / "good").is_dir()


def test_output_paths_are_checked_before_the_work(tmp_path, model_dir, dataset_dir, trained):
    img = next((dataset_dir / "test" / "good").glob("*.png"))
    (tmp_path / "afile").write_text("")
    res = runner.invoke(app, ["predict", str(img), "-m", str(model_dir), "--heatmaps", str(tmp_path / "afile")])
    assert res.exit_code == 1 and "afile is a file; expected a folder for the heatmaps" in res.output
    res = runner.invoke(app, ["evaluate", "-m", str(model_dir), "-d", str(dataset_dir), "--metrics", str(tmp_path)])
    assert res.exit_code == 1 and "is a folder; expected a file path for the metrics JSON" in res.output
    res = runner.invoke(app, ["train", "-d", str(dataset_dir), "-o", str(tmp_path / "afile")])
    assert res.exit_code == 1 and "afile is a file" in res.output  # refused before training


def test_heatmaps_of_two_images_with_one_name_are_both_kept(tmp_path, model_dir, dataset_dir, trained):
    img = next((dataset_dir / "test" / "good").glob("*.png"))
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.png").write_bytes(img.read_bytes())
    res = runner.invoke(app, ["predict", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                              "-m", str(model_dir), "--heatmaps", str(tmp_path / "h")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["x_1_heatmap.png", "x_2_heatmap.png"]


def test_client_predict_checks_its_url_and_folder_before_sending(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    res = runner.invoke(app, ["client", "predict", str(tmp_path), "--url", "notaurl"])
    assert res.exit_code == 1 and "expected the service's address, http(s)://host:port" in res.output
    res = runner.invoke(app, ["client", "predict", str(tmp_path / "a.png")])
    assert res.exit_code == 1 and "a.png is a file; expected a folder of images" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["client", "predict", str(tmp_path / "empty"), "--out", str(tmp_path / "r.csv")])
    assert res.exit_code == 1 and "no images under" in res.output
    res = runner.invoke(app, ["client", "predict", str(tmp_path), "--url", "http://127.0.0.1:1",
                              "--out", str(tmp_path / "out" / "r.csv"), "--events", str(tmp_path / "out" / "e.log")])
    assert res.exit_code == 1 and "1 failed" in res.output
    assert "first failure: " in res.output and "ConnectError" in res.output  # the reason, not only in the CSV


def test_a_tracking_server_that_does_not_answer_is_one_line(monkeypatch):
    import os

    keys = [f"MLFLOW_HTTP_REQUEST_{k}" for k in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT")]
    for key in keys:  # unset for the command, and whatever it sets is undone after the test
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    res = runner.invoke(app, ["models", "list"])
    assert res.exit_code == 1 and "TrackingError: MLflow (http://127.0.0.1:1) failed" in res.output
    assert "Traceback" not in res.output
    assert [os.environ.get(k) for k in keys] == ["2", "1", "30"]  # a few quick tries, not MLflow's minutes


def test_predict_scores_the_readable_images_and_names_the_others(tmp_path, model_dir, dataset_dir, trained):
    img = next((dataset_dir / "test" / "good").glob("*.png"))
    (tmp_path / "bad.png").write_text("not a png")
    res = runner.invoke(app, ["predict", str(tmp_path / "bad.png"), str(img), "-m", str(model_dir), "--json"])
    assert res.exit_code == 1
    bad, good = json.loads(res.stdout[: res.stdout.rindex("]") + 1])
    assert bad["status"] == "error" and "bad.png: not an image" in bad["error"]
    assert good["status"] == "ok" and good["image"] == str(img)
    assert good["anomaly_score"] == pytest.approx(float(trained.model.score_images([img]).scores[0]), rel=1e-4)


def test_predict_names_a_file_the_system_cannot_read_and_scores_the_others(tmp_path, model_dir, dataset_dir,
                                                                          trained):
    """An OSError while reading (here EIO: /proc/self/mem, which even root cannot read whole; for others a
    permission) is that file's row, not the end of the run."""
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs Linux's /proc")
    img = next((dataset_dir / "test" / "good").glob("*.png"))
    unreadable = tmp_path / "unreadable.png"
    unreadable.symlink_to("/proc/self/mem")
    res = runner.invoke(app, ["predict", str(unreadable), str(img), "-m", str(model_dir), "--json"])
    assert res.exit_code == 1, res.output
    bad, good = json.loads(res.stdout[: res.stdout.rindex("]") + 1])
    assert bad["status"] == "error"
    assert bad["error"].startswith("OSError: Input/output error"), bad
    assert good["status"] == "ok"


def test_a_mistyped_sqlite_store_is_said_not_made(tmp_path, monkeypatch):
    store = tmp_path / "mlflw" / "mlflow.db"  # a typo: no such store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    predict = ["predict", str(tmp_path / "a.png"), "-m", "champion"]
    for cmd in (["models", "list"], ["models", "rollback"], predict, ["export", "models:/cellscan@champion"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 1, (cmd, res.output)
        assert f"RegistryError: no MLflow store at {store}" in res.output, (cmd, res.output)
    res = runner.invoke(app, ["models", "list", "--help"])  # help needs no store
    assert res.exit_code == 0, res.output
    assert "Registered versions" in res.output
    assert not store.parent.exists()  # nothing was created where the typo pointed
