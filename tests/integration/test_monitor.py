"""Monitoring with real components: a trained champion (sqlite MLflow), its reference, the prediction log
filled by batch scoring, real Evidently reports, and the monitor flow in Prefect's test harness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellscan.core.images import encode_png, load_image, save_png
from cellscan.core.synth import generate
from cellscan.mlops import batchscore
from cellscan.mlops.monitor import check as monitor
from cellscan.mlops.monitor.predlog import PredictionLog
from cellscan.mlops.monitor.reference import load_reference
from cellscan.settings import Settings
from tests.integration.conftest import make_project

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory, prefect_harness):  # type: ignore[no-untyped-def]
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = make_project(tmp_path_factory.mktemp("mon") / "proj", **{"synth.n_test_good": 30})
    from flows.training import train_flow

    out = train_flow(project=str(root))
    assert out["version"] == 1
    return root


# Seeds of the normal stream: the tiny 3-epoch model's scores are noisy and the reference is 30 images, so
# a K-S test at p < 0.01 flags about one seed in a hundred by chance (seed 101 is one: p = 0.008); 404 is not.
def _stream(folder: Path, seed: int, n: int = 40, shift: float = 0.0, blur: bool = False) -> Path:
    """``n`` normal synthetic slices (another seed than the training set), optionally brighter / blurred."""
    tmp = folder.parent / f".{folder.name}-raw"
    generate(tmp, size=48, n_train=2, n_test_good=n, n_per_defect=0, seed=seed)
    folder.mkdir(parents=True)
    for p in sorted((tmp / "test" / "good").glob("*.png")):
        x = load_image(p)[..., 0]
        if blur:
            x = sum(np.roll(x, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
        save_png(np.clip(x + shift, 0, 1), folder / p.name, 16)
    shutil.rmtree(tmp)
    return folder


def test_normal_stream_no_drift_then_shifted_stream_drifts_once_per_cooldown(trained_project, tmp_path):
    root = trained_project
    settings = Settings.from_env(root)
    params = __import__("cellscan.core.config", fromlist=["load_params"]).load_params(root / "params.yaml")
    params = params.with_overrides({"monitor.window": 40, "monitor.min_samples": 20})

    ref = load_reference(settings, 1)  # logged at registration: the 30 validation normals
    assert len(ref) == 30 and {"mean", "sharpness", "emb_7", "score", "is_anomaly"} <= set(ref.columns)

    m = batchscore.score_folder(settings, _stream(tmp_path / "normal", seed=404), tmp_path / "out-normal")
    assert m["images"] == 40 and (tmp_path / "out-normal" / "results.csv").is_file()
    assert {"process_seconds", "ms_per_prediction", "mean_score", "anomaly_rate"} <= set(
        json.loads((tmp_path / "out-normal" / "metrics.json").read_text()))
    assert "cellscan_batch_anomaly_rate" in (tmp_path / "out-normal" / "metrics.prom").read_text()
    assert PredictionLog.from_settings(settings).count() == 40

    out = monitor.check(settings, params)
    print(monitor.summary_line(out))
    assert out["status"] == "no drift" and out["events"] == [] and out["drifted"] == []
    latest = settings.monitor_dir / "reports" / "latest.json"
    assert json.loads(latest.read_text())["summary"]["drift"] is False

    batchscore.score_folder(settings, _stream(tmp_path / "shifted", seed=202, shift=0.2, blur=True),
                            tmp_path / "out-shifted")
    out = monitor.check(settings, params)
    print(monitor.summary_line(out))
    assert out["drift"] and [e["event"] for e in out["events"]] == [monitor.DRIFT_EVENT]
    assert {"mean", "sharpness"} <= set(out["drifted"])
    body = json.loads(latest.read_text())
    assert body["summary"]["drifted"] == out["drifted"] and body["batches"] and body["days"]
    assert (settings.monitor_dir / "reports" / "latest.html").stat().st_size > 10_000

    import mlflow

    runs = mlflow.search_runs(experiment_names=["monitoring"])
    assert len(runs) == 2 and set(runs["tags.model_version"]) == {"1"}
    assert sorted(runs["tags.drift"]) == ["false", "true"]

    # A second drift inside the cooldown: reported, but no event (no second retrain).
    again = monitor.check(settings, params)
    assert again["drift"] and again["events"] == [] and monitor.DRIFT_EVENT in again["suppressed"]

    # Past the cooldown, the same predictions are no new evidence: no event (an idle line is not retrained
    # after every cooldown); a new shifted batch is.
    later = params.with_overrides({"monitor.cooldown_minutes": 0})
    idle = monitor.check(settings, later)
    assert idle["drift"]
    assert idle["events"] == []
    assert monitor.DRIFT_EVENT in idle["suppressed"]
    batchscore.score_folder(settings, _stream(tmp_path / "shifted-2", seed=303, shift=0.2, blur=True),
                            tmp_path / "out-shifted-2")
    fresh = monitor.check(settings, later)
    assert fresh["drift"]
    assert [e["event"] for e in fresh["events"]] == [monitor.DRIFT_EVENT], fresh


def test_monitor_flow_emits_the_drift_event(trained_project, tmp_path):
    from flows.monitor import monitor_flow

    root = trained_project
    shifted = _stream(tmp_path / "shifted", seed=606, shift=0.2, blur=True)
    batchscore.score_folder(Settings.from_env(root), shifted, tmp_path / "out-shifted")  # newer than the last
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace(
        "cooldown_minutes: 360", "cooldown_minutes: 0"))
    out = monitor_flow(project=str(root))
    assert out["drift"] and out["event_ids"] and out["event_ids"][0]


def test_batch_scoring_scores_every_page_of_a_stack(trained_project, tmp_path):
    """A CT volume sent as one multi-page TIFF: each slice is scored as if it were its own file."""
    import csv

    from PIL import Image

    settings = Settings.from_env(trained_project)
    slices = _stream(tmp_path / "slices", seed=505, n=3)
    pages = [Image.open(p) for p in sorted(slices.glob("*.png"))]
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    pages[0].save(stacks / "volume.tif", format="TIFF", save_all=True, append_images=pages[1:])
    (stacks / "broken.tif").write_bytes((stacks / "volume.tif").read_bytes()[:200])

    def rows(folder: Path) -> list[dict[str, str]]:
        batchscore.score_folder(settings, folder, tmp_path / f"out-{folder.name}", log=False)
        with (tmp_path / f"out-{folder.name}" / "results.csv").open() as f:
            return list(csv.DictReader(f))

    single, stacked = rows(slices), rows(stacks)
    by_label = {r["image"]: r for r in stacked}
    assert by_label[str(stacks / "broken.tif")]["status"] == "error"
    assert [r["image"] for r in stacked if r["status"] == "ok"] == [
        f"{stacks / 'volume.tif'}#page={k}" for k in (1, 2, 3)]
    for k, r in enumerate(single, 1):
        page = by_label[f"{stacks / 'volume.tif'}#page={k}"]
        assert float(page["anomaly_score"]) == pytest.approx(float(r["anomaly_score"]), rel=1e-5)


def test_manual_monitor_run_without_a_server_does_not_arm_the_cooldown(trained_project):
    """Without PREFECT_API_URL the event would go to a temporary server, gone with the run: not delivered."""
    from flows.monitor import emit
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = Settings.from_env(trained_project)
    log = PredictionLog.from_settings(settings)
    alert = log.add_alert(monitor.DRIFT_EVENT, 1, True, {"columns": ["mean"]})
    out = {"model_version": 1, "events": [{"event": monitor.DRIFT_EVENT, "payload": {}, "alert_id": alert}]}
    before = log.last_emitted_alert((monitor.DRIFT_EVENT,))
    assert before is not None and before[0] > 0
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert emit.fn(settings, out) == [""]
    after = log.last_emitted_alert((monitor.DRIFT_EVENT,))
    assert after is None or after[0] < before[0]  # this alert no longer counts as sent


def test_batch_results_are_kept_when_the_prediction_log_fails(trained_project, tmp_path, monkeypatch):
    settings = Settings.from_env(trained_project)
    calls = {"n": 0}
    real = PredictionLog.write

    def flaky(self, items):  # noqa: ANN001, ANN202 - a database restarting during the second chunk
        calls["n"] += 1
        if calls["n"] == 2:
            msg = "database is locked"
            raise RuntimeError(msg)
        return real(self, items)

    monkeypatch.setattr(PredictionLog, "write", flaky)
    before = PredictionLog.from_settings(settings).count()
    stream = _stream(tmp_path / "normal", seed=404, n=40)
    m = batchscore.score_folder(settings, stream, tmp_path / "out", chunk=16)
    assert m["images"] == 40 and m["not_logged"] == 16
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 41
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["not_logged"] == 16
    assert PredictionLog.from_settings(settings).count() == before + 24



def test_a_rolled_back_version_is_judged_on_its_predictions_since_it_came_back(trained_project, tmp_path):
    """v1's rows from before v2 served are history: after a rollback to v1, only its new scans count."""
    from cellscan.core.config import load_params
    from cellscan.mlops import registry, steps

    settings = Settings.from_env(trained_project)
    params = load_params(trained_project / "params.yaml")
    log = PredictionLog.from_settings(settings)
    batchscore.score_folder(settings, _stream(tmp_path / "v1-scans", seed=404, n=30), tmp_path / "out-v1")
    assert len(log.frame(model_version=1)) >= 30  # v1's predictions before v2 served
    model, _ = registry.load_model(1, settings)
    v2 = steps.register_bundle(settings, params, trained_project, model.save(tmp_path / "v2"))["version"]
    registry.promote(settings, v2, "test")
    batchscore.score_folder(settings, _stream(tmp_path / "v2-scans", seed=404, n=10), tmp_path / "out-v2")
    assert registry.rollback(settings) == 1
    small = params.with_overrides({"monitor.window": 40, "monitor.min_samples": 20})
    out = monitor.check(settings, small)
    assert out["status"].startswith("0 predictions of version 1 with image descriptors since it became the "
                                    "champion ("), out["status"]
    batchscore.score_folder(settings, _stream(tmp_path / "after", seed=404, n=30), tmp_path / "out")
    out = monitor.check(settings, small)
    assert out["n"] == 30, out
