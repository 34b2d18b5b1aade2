"""Prediction log on a real sqlite store: descriptors, embedding, retention, background writer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from cellscan.core.images import encode_png
from cellscan.mlops.monitor.descriptors import DESCRIPTORS, EMBED_DIM, describe, embed, header
from cellscan.mlops.monitor.predlog import Item, LogWriter, PredictionLog
from cellscan.settings import Settings


def _img(seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.uniform(0.2, 0.6, (24, 24, 1)) + shift, 0, 1).astype(np.float32)


def test_descriptors_follow_brightness_and_blur():
    x = np.stack([_img(0), _img(0, 0.3)])
    d = dict(zip(DESCRIPTORS, describe(x).T, strict=True))
    assert d["mean"][1] == pytest.approx(d["mean"][0] + 0.3, abs=1e-3)
    blurred = (x[:1] + np.roll(x[:1], 1, 1) + np.roll(x[:1], 1, 2) + np.roll(x[:1], 1, (1, 2))) / 4
    assert describe(blurred)[0, DESCRIPTORS.index("sharpness")] < d["sharpness"][0] / 2
    e = embed(x, x[..., 0])
    assert e.shape == (2, EMBED_DIM) and np.allclose(e, embed(x, x[..., 0]))  # deterministic
    assert header(encode_png(_img(1)[..., 0], 16)) == (24, 24, 16)


def test_log_writes_reads_and_prunes(tmp_path):
    s = Settings.from_env(tmp_path, env={"CELLSCAN_KEEP_IMAGES_DAYS": "1"})
    assert s.prediction_db == f"sqlite:///{tmp_path / 'monitoring' / 'predictions.db'}"
    log = PredictionLog.from_settings(s)
    rec = {"anomaly_score": 0.5, "reconstruction_error": 0.1, "threshold": 1.0, "is_anomaly": False}
    old = time.time() - 3 * 86400
    items = [Item(_img(i), encode_png(_img(i)[..., 0]), rec, np.arange(EMBED_DIM, dtype=float), "upload", f"{i}.png",
                  3, 0.01, "b1", ts=old if i == 0 else time.time()) for i in range(3)]
    writer = LogWriter(log)
    for it in items:
        writer.submit(it)
    writer.flush()
    df = log.frame(model_version=3)
    assert len(df) == 3 and writer.written == 3 and df["emb_7"].tolist() == [7.0] * 3
    assert set(DESCRIPTORS) <= set(df.columns) and df["bit_depth"].tolist() == [8, 8, 8]
    # The writer prunes as it starts: the 3-day-old image is gone (retention 1 day), the others are kept.
    assert df["image_path"].isna().tolist() == [True, False, False]
    assert all(Path(p).is_file() for p in df["image_path"][1:])
    assert log.prune() == 0
    alert = log.add_alert("drift", 3, True, {"columns": ["mean"]})
    assert log.last_emitted(("drift",)) is not None and log.last_emitted(("rate",)) is None
    assert log.last_emitted_alert(("drift",))[1:] == (3, {"columns": ["mean"]})
    log.not_emitted(alert)  # its event could not be sent: it arms no cooldown
    assert log.last_emitted(("drift",)) is None
    writer.close()


def test_a_batch_where_nothing_scored_writes_strict_json(tmp_path):
    """No image scored: no mean score, written as null (NaN is not JSON; strict parsers refuse it)."""
    import json

    from cellscan.mlops.monitor.batches import summarise, write_metrics

    m = summarise([{"image": "a.png", "status": "error", "error": "not an image"}], 0.5, "batch-x")
    write_metrics(tmp_path, m)
    body = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert body["mean_score"] is None and body["failed"] == 1 and body["scored"] == 0


def test_edge_rows_do_not_push_the_services_own_predictions_out_of_the_drift_window(tmp_path):
    """An edge device posting many results must not leave the monitor with no row it can compare."""
    from cellscan.serve.edgelog import edge_rows

    log = PredictionLog.from_settings(Settings.from_env(tmp_path, env={}))
    rec = {"anomaly_score": 0.5, "reconstruction_error": 0.1, "threshold": 1.0, "is_anomaly": False}
    now = time.time()
    log.write([Item(_img(i), encode_png(_img(i)[..., 0]), rec, np.arange(EMBED_DIM, dtype=float), "upload",
                    f"{i}.png", 3, 0.01, "b1", ts=now - 100 + i) for i in range(40)])
    body = {"model_version": 3, "records": [{"image": f"e{i}.png", "anomaly_score": 0.2, "threshold": 1.0,
                                             "is_anomaly": False, "time": now + i} for i in range(60)]}
    rows, _ = edge_rows(body, now=now)
    log.insert(rows)
    mixed = log.frame(model_version=3, limit=50)
    assert mixed["source"].tolist() == ["edge"] * 50  # the newest 50 rows of any source
    own = log.frame(model_version=3, limit=50, with_pixels=True)
    assert len(own) == 40
    assert set(own["source"]) == {"upload"}
    assert own[list(DESCRIPTORS)].notna().all().all()
    assert own["emb_0"].notna().all()


def test_an_image_that_cannot_be_kept_does_not_lose_the_batchs_rows(tmp_path):
    log = PredictionLog.from_settings(Settings.from_env(tmp_path, env={}))
    assert log.image_dir is not None
    log.image_dir.parent.mkdir(parents=True, exist_ok=True)
    log.image_dir.write_text("a file where the image folders go: every image write fails")
    rec = {"anomaly_score": 0.5, "reconstruction_error": 0.1, "threshold": 1.0, "is_anomaly": False}
    n = log.write([Item(_img(i), encode_png(_img(i)[..., 0]), rec, np.arange(EMBED_DIM, dtype=float), "upload",
                        f"{i}.png", 3, 0.01, "b1") for i in range(3)])
    df = log.frame(model_version=3)
    assert n == 3
    assert df["name"].tolist() == ["0.png", "1.png", "2.png"]
    assert df["image_path"].isna().all()


def test_a_days_process_time_is_its_batches_not_the_hours_between_them():
    import pandas as pd

    from cellscan.mlops.monitor.batches import batch_metrics, days_since

    day = 20_000 * 86400.0  # a UTC midnight
    ts = [day + 3600, day + 3600.05, day + 8 * 3600, day + 8 * 3600 + 0.05, day + 9 * 3600]
    df = pd.DataFrame({"ts": ts,
                       "latency_ms": [50.0, 50.0, 50.0, 50.0, 30.0], "batch_id": ["a", "a", "b", "b", None],
                       "day": ["d"] * 5, "is_anomaly": [0.0, 1.0, 0.0, 0.0, 0.0], "score": [0.1] * 5})
    (row,) = batch_metrics(df, "day")
    assert row["process_seconds"] == pytest.approx(0.1 + 0.1 + 0.03)  # two 100-ms batches and a loose scan
    assert row["ms_per_prediction"] == pytest.approx(230 / 5)
    assert [r["process_seconds"] for r in batch_metrics(df)] == pytest.approx([0.1, 0.1, 0.03])
    assert days_since(day + 23 * 3600, 2) == day - 86400  # yesterday and today, whole
    assert days_since(day + 60, 1) == day


def test_closing_a_writer_stuck_on_a_slow_database_is_bounded_and_said(caplog):
    import threading

    release = threading.Event()

    class SlowLog:  # a database that hangs (a PostgreSQL failing over)
        def write(self, batch):  # noqa: ANN001, ANN202
            release.wait(10)
            return len(batch)

        def prune(self) -> int:
            return 0

    writer = LogWriter(SlowLog(), max_queue=2)  # type: ignore[arg-type]
    rec = {"anomaly_score": 0.5, "reconstruction_error": 0.1, "threshold": 1.0, "is_anomaly": False}
    for i in range(5):  # one taken by the writer, two queued, two dropped: the queue is full
        writer.submit(Item(_img(i), b"", rec, None, "upload", f"{i}.png", 3, 0.01))
        time.sleep(0.05)
    t0 = time.monotonic()
    with caplog.at_level("WARNING"):
        writer.close(timeout=0.3)
    assert time.monotonic() - t0 < 1.5  # not blocked on the full queue
    assert "queued rows not written at shutdown (writing took over 0.3 s)" in caplog.text
    release.set()


def test_requests_served_at_the_same_time_count_once_in_a_days_process_time():
    import pandas as pd

    from cellscan.mlops.monitor.batches import batch_metrics

    day = 20_000 * 86400.0
    # four 10-second requests side by side (clients at once), then one 1-second request an hour later
    ts = [day + 10.0, day + 10.0, day + 10.0, day + 10.0, day + 3601.0]
    df = pd.DataFrame({"ts": ts, "latency_ms": [10_000.0] * 4 + [1000.0], "batch_id": list("abcde"),
                       "day": ["d"] * 5, "is_anomaly": [0.0] * 5, "score": [0.1] * 5})
    (row,) = batch_metrics(df, "day")
    assert row["process_seconds"] == pytest.approx(11.0)
