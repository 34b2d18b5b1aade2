"""The MLOps loop with real components: Prefect flows (test harness), sqlite MLflow, DVC."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from cellscan.mlops import steps as pipeline
from cellscan.mlops import registry
from cellscan.core.bundle import CellscanModel
from cellscan.cli import app
from cellscan.core.config import load_params
from cellscan.core.data import load_dataset
from cellscan.core.evaluate import evaluate_model
from cellscan.mlops.versioning import data_hash

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _train(project, **kw):
    from flows.training import train_flow

    return train_flow(project=str(project), **kw)


def _scores(settings, project, ref="champion"):
    model, version = registry.load_model(settings, ref)
    paths = sorted((project / "data/cells/test").rglob("*.png"))
    return version, model.score_images(paths).scores


def test_train_flow_registers_a_champion_with_its_data_version(project, settings):
    out = _train(project)
    assert out["promoted"] and out["reason"] == "no champion yet"
    assert out["data_hash"] == data_hash(project) and out["data_hash"].endswith(".dir")
    rows = registry.list_versions(settings)
    assert [(r["version"], r["aliases"]) for r in rows] == [(1, ["champion"])]
    assert rows[0]["data_hash"] == data_hash(project)

    import mlflow

    run = mlflow.get_run(out["run_id"])
    assert run.data.tags["data_hash"] == data_hash(project)
    assert "image_auroc" in run.data.metrics and "epoch_loss" in run.data.metrics
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"], "evaluation")}
    assert {"evaluation/roc.png", "evaluation/score_histogram.png", "evaluation/data.dvc"} <= arts

    # The CLI predicts from the registry alias.
    img = next((project / "data/cells/test/void").glob("*.png"))
    res = CliRunner().invoke(app, ["predict", str(img), "--model", "models:/cellscan@champion", "--json"],
                             env={"MLFLOW_TRACKING_URI": settings.tracking_uri})
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["threshold"] == pytest.approx(rows[0]["threshold"])


def test_worse_challenger_is_not_promoted(project, settings):
    _train(project)
    champion, _ = registry.load_model(settings)
    # A challenger that copies its input: zero error everywhere, so it cannot tell anomalies apart.
    inp = keras.Input(champion.keras_model.input_shape[1:])
    identity = keras.Model(inp, keras.layers.Identity()(inp))
    challenger = CellscanModel(identity, dict(champion.meta), champion.stats)
    root = project / "data/cells"
    ev = evaluate_model(challenger, load_dataset(root), calibrate=True)
    challenger = challenger.with_threshold(ev.threshold)
    reg = registry.log_and_register(settings, challenger, ev, data_hash=data_hash(project), kind="train")
    params = load_params(project / "params.yaml")
    decision = pipeline.gate(settings, reg, params, root)
    assert not decision["promoted"]
    assert decision["reason"].startswith("worse: image_auroc 0.5000")
    aliases = {r["version"]: r["aliases"] for r in registry.list_versions(settings)}
    assert aliases == {1: ["champion"], 2: ["challenger"]}


def test_rollback_restores_the_previous_champions_predictions(project, settings):
    _train(project)
    v1, s1 = _scores(settings, project)
    _train(project, overrides={"base.seed": 5})
    registry.promote(settings, 2, "test")
    v2, s2 = _scores(settings, project)
    assert (v1, v2) == (1, 2) and not np.allclose(s1, s2)

    runner = CliRunner()
    res = runner.invoke(app, ["models", "rollback"], env={"MLFLOW_TRACKING_URI": settings.tracking_uri})
    assert res.exit_code == 0 and "champion is now version 1" in res.stdout
    v, s = _scores(settings, project)
    assert v == 1
    np.testing.assert_allclose(s, s1, rtol=1e-5)
    # Nothing earlier to roll back to now: a clear error, the champion stays.
    res = runner.invoke(app, ["models", "rollback"], env={"MLFLOW_TRACKING_URI": settings.tracking_uri})
    assert res.exit_code == 1 and "no previous champion" in res.output
    assert registry.champion_version(settings) == 1


def test_training_that_fails_midway_leaves_the_champion(project, settings, monkeypatch):
    _train(project)
    before = registry.list_versions(settings)
    images_before = sorted(p.name for p in (project / "data/cells").rglob("*.png"))

    import cellscan.core.train as train_mod

    calls = {"n": 0}
    real = train_mod.simulate_anomaly

    def crash_after_a_few(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            msg = "simulated crash during training"
            raise RuntimeError(msg)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "simulate_anomaly", crash_after_a_few)
    from flows.training import train_flow

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_flow(project=str(project))
    assert calls["n"] > 3  # it did fail inside fitting
    assert registry.list_versions(settings) == before
    assert registry.champion_version(settings) == 1
    assert sorted(p.name for p in (project / "data/cells").rglob("*.png")) == images_before


def test_retrain_takes_temp_images_as_a_new_data_version(project, settings):
    _train(project)
    first_hash = data_hash(project)
    train_dir = project / "data/cells/train/good"
    temp = project / "data/cells/temp"
    temp.mkdir()
    for p in sorted(train_dir.glob("*.png"))[:2]:
        shutil.copy(p, temp / f"scan_{p.name}")
    n_train = len(list(train_dir.glob("*.png")))

    from flows.retrain import retrain_flow

    out = retrain_flow(project=str(project), overrides={"retrain.epochs": 1})
    assert out["moved"] == 2 and out["version"] == 2
    assert out["data_hash"] != first_hash == registry.list_versions(settings)[-1]["data_hash"]
    assert len(list(train_dir.glob("*.png"))) == n_train + 2 and not list(temp.glob("*.png"))
    assert {"new_validation_error", "new_anomaly_error"} <= set(out)


def test_evaluate_threshold_flow_makes_a_new_version(project, settings):
    _train(project)
    old = registry.list_versions(settings)[0]
    # A newly labelled anomaly changes the anomaly set the threshold is calibrated on.
    src = next((project / "data/cells/test/void").glob("*.png"))
    pipeline.add_images(project / "data/cells", "anomaly", [("new.png", src.read_bytes())], defect="void")

    from flows.evaluate_threshold import evaluate_threshold_flow

    out = evaluate_threshold_flow(project=str(project))
    assert out["version"] == 2 and out["previous_threshold"] == pytest.approx(old["threshold"])
    rows = {r["version"]: r for r in registry.list_versions(settings)}
    assert rows[1]["threshold"] == pytest.approx(old["threshold"])  # the old version is unchanged
    assert rows[2]["kind"] == "threshold"
    assert np.isfinite(out["new_validation_error"]) and np.isfinite(out["new_anomaly_error"])
