from __future__ import annotations

import json

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
