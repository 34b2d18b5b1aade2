"""The MLOps loop with real components: Prefect flows (test harness), sqlite MLflow, DVC."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cellscan.mlops import steps as pipeline
from cellscan.mlops import registry
from cellscan.cli import app
from cellscan.mlops.versioning import data_hash

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _train(project, **kw):
    from flows.training import train_flow

    return train_flow(project=str(project), **kw)


def _scores(settings, project, ref="champion"):
    model, version = registry.load_model(ref, settings)
    paths = sorted((project / "data/cells/test").rglob("*.png"))
    return version, model.score_images(paths).scores


def _cli(settings, *args):
    env = {"MLFLOW_TRACKING_URI": settings.tracking_uri, "CELLSCAN_HOME": str(settings.home)}
    # What the models commands set for themselves (quick retries) is undone after each call.
    env |= dict.fromkeys(f"MLFLOW_HTTP_REQUEST_{k}" for k in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT"))
    return CliRunner().invoke(app, list(args), env=env)


def test_train_flow_registers_a_champion_with_its_data_version(project, settings):
    out = _train(project)
    assert out["promoted"] and out["reason"] == "no champion yet"
    assert out["data_hash"] == data_hash(project) and out["data_hash"].endswith(".dir")
    assert {"new_validation_error", "new_anomaly_error", "version", "promoted", "reason"} <= set(out)
    rows = registry.list_versions(settings)
    assert [(r["version"], r["aliases"]) for r in rows] == [(1, ["champion"])]
    assert rows[0]["data_hash"] == data_hash(project)

    import mlflow

    # The run spans the training, has a readable name and the data version as a dataset input.
    run = mlflow.get_run(out["run_id"])
    assert run.info.run_name == out["run_name"] == f"train-{data_hash(project)[:8]}"
    assert run.info.status == "FINISHED"
    assert run.info.end_time - run.info.start_time >= 1000 * run.data.metrics["train_seconds"]
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == data_hash(project)
    assert run.data.tags["data_hash"] == data_hash(project)
    assert "image_auroc" in run.data.metrics and "epoch_loss" in run.data.metrics
    assert any(name.startswith("auroc_area_") for name in run.data.metrics)  # detection by defect size
    assert run.data.metrics["threshold"] == pytest.approx(rows[0]["threshold"])
    mc = mlflow.MlflowClient()
    hist = mc.get_metric_history(out["run_id"], "epoch_loss")  # logged live, one point per epoch
    assert [m.step for m in hist] == list(range(len(hist))) and len(hist) >= 1
    assert all(run.info.start_time <= m.timestamp <= run.info.end_time for m in hist)
    arts = {a.path for a in mc.list_artifacts(out["run_id"], "evaluation")}
    assert {"evaluation/roc.png", "evaluation/score_histogram.png", "evaluation/data.dvc",
            "evaluation/examples.png"} <= arts

    # The version holds the bundle once (a pyfunc); no threshold in its tags; the gate's reason in its description.
    mv = mc.get_model_version("cellscan", "1")
    assert "threshold" not in mv.tags and "no champion yet" in mv.description
    model, version = registry.load_model("models:/cellscan@champion", settings)
    assert version == 1 and model.threshold == pytest.approx(rows[0]["threshold"])
    pm = mlflow.pyfunc.load_model("models:/cellscan/1")
    img = next((project / "data/cells/test/void").glob("*.png"))
    pred = pm.predict([str(img)])
    assert pred["threshold"].iloc[0] == pytest.approx(model.threshold)

    # The CLI predicts from the registry alias, and shows the lineage.
    res = _cli(settings, "predict", str(img), "--model", "models:/cellscan@champion", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["threshold"] == pytest.approx(rows[0]["threshold"])
    res = _cli(settings, "models", "show", "1", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["run_name"] == out["run_name"] and info["data_hash"] == data_hash(project)
    assert info["gate"] == "promoted: no champion yet" and info["compared_with"] == "none"
    assert info["params"]["train.epochs"] == "3" and "image_auroc" in info["metrics"]


def test_worse_challenger_registered_from_a_directory_is_not_promoted(project, settings, tmp_path):
    _train(project)
    champion, _ = registry.load_model("champion", settings)
    # A challenger whose threshold flags nothing: it finds no anomaly (f1 0), the champion does.
    bundle = champion.with_threshold(1e9).save(tmp_path / "bundle")

    res = _cli(settings, "models", "register", str(bundle), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 2 and not out["promoted"]
    assert out["reason"].startswith("worse: f1 ")
    aliases = {r["version"]: r["aliases"] for r in registry.list_versions(settings)}
    assert aliases == {1: ["champion"], 2: ["challenger"]}
    info = registry.lineage(settings, 2)
    assert info["compared_with"] == "1" and info["champion_metrics"]["f1"] > 0
    assert info["gate"].startswith("rejected: worse") and "compared with champion version 1" in info["description"]
    assert info["run_name"] == f"register-{data_hash(project)[:8]}"



def test_a_registered_bundle_and_the_champion_are_judged_at_their_own_thresholds(project, settings, tmp_path):
    """A champion whose threshold flags nothing any more must not be re-tuned on the data for the gate while
    the registered bundle keeps its own: each is compared as it would serve."""
    _train(project)
    model, _ = registry.load_model("champion", settings)
    blind = model.with_threshold(1e9).save(tmp_path / "blind")
    res = _cli(settings, "models", "register", str(blind), "--json")
    assert res.exit_code == 0, res.output
    assert not json.loads(res.stdout)["promoted"]
    registry.promote(settings, 2, "test: the champion's threshold flags nothing")
    res = _cli(settings, "models", "register", str(model.save(tmp_path / "tuned")), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 3 and out["promoted"], out
    assert registry.lineage(settings, 3)["champion_metrics"]["f1"] == 0.0

def test_rollback_after_an_alias_move_made_outside_cellscan(project, settings):
    _train(project)
    v1, s1 = _scores(settings, project)
    _train(project, overrides={"base.seed": 5})
    # Someone moves the alias in the MLflow UI (not through cellscan): no history tag is written.
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias("cellscan", "champion", "2")
    v2, s2 = _scores(settings, project)
    assert (v1, v2) == (1, 2) and not np.allclose(s1, s2)
    assert registry.previous_champion(settings) == 1

    res = _cli(settings, "models", "rollback")
    assert res.exit_code == 0 and "champion is now version 1" in res.stdout
    v, s = _scores(settings, project)
    assert v == 1
    np.testing.assert_allclose(s, s1, rtol=1e-5)
    # Nothing earlier to roll back to now: a clear error, the champion stays.
    res = _cli(settings, "models", "rollback")
    assert res.exit_code == 1 and "no previous champion" in res.output
    assert registry.champion_version(settings) == 1
    # Version 2 was rolled back from: promoting again is explicit, and then rollback returns to 1.
    registry.promote(settings, 2, "test")
    assert registry.rollback(settings) == 1
    # Rolling "back" to a newer version is allowed (after a rollback) but said; then back to 1.
    res = _cli(settings, "models", "rollback", "models:/cellscan/2")
    assert res.exit_code == 0 and "champion is now version 2" in res.stdout and "rolled forward" in res.output
    assert registry.rollback(settings, 1) == 1
    # A version that cannot be loaded (its files gone) is refused before the alias moves.
    broken = mlflow.MlflowClient().create_model_version("cellscan", str(project / "no-such-model"))
    res = _cli(settings, "models", "rollback", str(broken.version))
    assert res.exit_code == 1, res.output
    assert "cannot be loaded" in res.output, res.output
    assert "champion is unchanged" in res.output, res.output
    assert registry.champion_version(settings) == 1
    res = _cli(settings, "models", "promote", str(broken.version))  # promote checks the same
    assert res.exit_code == 1, res.output
    assert "cannot be loaded" in res.output, res.output
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
    import mlflow

    last = mlflow.search_runs(experiment_names=["cellscan"], order_by=["start_time DESC"], max_results=1)
    assert last["status"].iloc[0] == "FAILED"
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
    assert {"new_validation_error", "new_anomaly_error", "promoted", "reason"} <= set(out)

    # Reproduce version 1: its data version comes back (in a separate folder), the project keeps the new one.
    res = _cli(settings, "models", "reproduce", "1", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["same_data"] and rep["restored_hash"] == first_hash != data_hash(project)
    assert rep["reproduced"]["n_normal"] == rep["logged"]["n_normal"]
    assert set(rep["diff"]) >= {"image_auroc", "f1", "validation_error"}
    assert len(list(train_dir.glob("*.png"))) == n_train + 2


def _fails(msg: str):  # type: ignore[no-untyped-def]
    """A stand-in for a step that raises ``msg`` (a crash injected into a real flow run)."""

    def fail(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError(msg)

    return fail


def test_a_failed_retrain_puts_the_new_images_back_in_temp(project, settings, monkeypatch):
    _train(project)
    first_hash = data_hash(project)
    train_dir = project / "data/cells/train/good"
    temp = project / "data/cells/temp"
    temp.mkdir()
    names = []
    for p in sorted(train_dir.glob("*.png"))[:2]:
        names.append(f"scan_{p.name}")
        shutil.copy(p, temp / names[-1])
    n_train = len(list(train_dir.glob("*.png")))

    import cellscan.core.train as train_mod

    real_fit = train_mod.fit_model

    monkeypatch.setattr(train_mod, "fit_model", _fails("simulated crash during retraining"))
    from flows.retrain import retrain_flow

    with pytest.raises(RuntimeError, match="simulated crash"):
        retrain_flow(project=str(project), overrides={"retrain.epochs": 1})
    assert sorted(p.name for p in temp.glob("*.png")) == sorted(names)  # back, under their own names
    assert len(list(train_dir.glob("*.png"))) == n_train
    from cellscan.mlops.versioning import dvc

    status = dvc("status", "data.dvc", cwd=project).stdout  # the recorded data version matches the folders
    assert "changed" not in status, status
    assert "up to date" in status, status
    assert data_hash(project) != first_hash  # it holds the two images waiting in temp/
    assert registry.champion_version(settings) == 1
    assert [r["version"] for r in registry.list_versions(settings)] == [1]

    # Once a version was made from them, a later failure (here in the gate) leaves them in training.
    monkeypatch.setattr(train_mod, "fit_model", real_fit)  # not monkeypatch.undo(): that restores the env too
    from cellscan.mlops import steps

    monkeypatch.setattr(steps, "gate", _fails("simulated gate failure"))
    with pytest.raises(RuntimeError, match="simulated gate failure"):
        retrain_flow(project=str(project), overrides={"retrain.epochs": 1})
    assert not list(temp.glob("*.png"))
    assert len(list(train_dir.glob("*.png"))) == n_train + 2
    assert max(r["version"] for r in registry.list_versions(settings)) == 2  # a version was made


def test_evaluate_threshold_flow_makes_a_new_version(project, settings):
    _train(project)
    old = registry.list_versions(settings)[0]
    # A newly labelled anomaly changes the anomaly set the threshold is calibrated on.
    src = next((project / "data/cells/test/void").glob("*.png"))
    pipeline.add_images(project / "data/cells", "anomaly", [("new.png", src.read_bytes())], defect="void")

    from flows.common import main
    from flows.evaluate_threshold import evaluate_threshold_flow

    result = project / "out" / "result.json"
    assert main(evaluate_threshold_flow, "test", ["--project", str(project), "--result", str(result)]) == 0
    out = json.loads(result.read_text())
    assert {"new_validation_error", "new_anomaly_error", "version", "promoted", "reason", "threshold"} <= set(out)
    assert out["version"] == 2 and out["previous_threshold"] == pytest.approx(old["threshold"])
    rows = {r["version"]: r for r in registry.list_versions(settings)}
    assert rows[1]["threshold"] == pytest.approx(old["threshold"])  # the old version is unchanged
    assert rows[2]["kind"] == "threshold"
    assert out["promoted"] and rows[2]["aliases"] == ["champion"]  # same network, same data: a tie
    assert np.isfinite(out["new_validation_error"]) and np.isfinite(out["new_anomaly_error"])
