"""The service's monitoring routes (the ops app, no model needed): latest report, batch and day metrics."""

from __future__ import annotations

import numpy as np
import pytest
from starlette.testclient import TestClient

from cellscan.core.images import encode_png
from cellscan.mlops.monitor.predlog import Item, PredictionLog
from cellscan.settings import Settings


@pytest.fixture
def ops(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CELLSCAN_HOME", str(tmp_path))
    monkeypatch.delenv("CELLSCAN_MONITOR_DIR", raising=False)
    monkeypatch.delenv("CELLSCAN_PREDICTION_DB", raising=False)
    from service import service

    service.settings.cache_clear()
    yield TestClient(service.ops)
    service.settings.cache_clear()


def test_report_routes_answer_404_then_the_latest_report(ops, tmp_path):
    assert ops.get("/monitoring/report").status_code == 404
    reports = tmp_path / "monitoring" / "reports"
    reports.mkdir(parents=True)
    (reports / "latest.html").write_text("<html>drift</html>")
    (reports / "latest.json").write_text('{"summary": {"drift": true}}')
    r = ops.get("/monitoring/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "drift" in r.text
    assert ops.get("/monitoring/report.json").json()["summary"]["drift"] is True


def test_batch_and_day_metrics_from_the_log(ops, tmp_path):
    log = PredictionLog.from_settings(Settings.from_env(tmp_path, env={}))
    x = np.full((8, 8, 1), 0.5, np.float32)
    recs = [{"anomaly_score": s, "reconstruction_error": 0.0, "threshold": 1.0, "is_anomaly": s > 1} for s in (0.5, 2.0)]
    log.write([Item(x, encode_png(x[..., 0]), r, None, "upload", "a.png", 1, 0.02, "req-1") for r in recs])
    body = ops.get("/monitoring/batches").json()
    (b,) = body["batches"]
    assert (b["key"], b["images"], b["anomaly"], b["normal"]) == ("req-1", 2, 1, 1)
    assert b["mean_score"] == pytest.approx(1.25) and b["process_seconds"] >= 0.02
    assert len(body["days"]) == 1
    text = ops.get("/monitoring/metrics").text
    assert "cellscan_day_anomaly_rate" in text and 'verdict="anomaly"' in text


def test_the_metrics_routes_open_the_log_once(ops, monkeypatch):
    opened = []
    real = PredictionLog.from_settings.__func__

    def counted(cls, settings):  # type: ignore[no-untyped-def]
        opened.append(settings.prediction_db)
        return real(cls, settings)

    monkeypatch.setattr(PredictionLog, "from_settings", classmethod(counted))
    for _ in range(5):  # a Prometheus scrape every 15 s: one engine, not one per scrape
        assert ops.get("/monitoring/metrics").status_code == 200
        assert ops.get("/monitoring/batches").status_code == 200
    assert len(opened) <= 1
