"""Edge results into the prediction log (cellscan.serve.edgelog) and the MLflow reachability probe."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cellscan.mlops.monitor.predlog import PredictionLog
from cellscan.serve.edgelog import EdgeRecordsError, edge_rows
from cellscan.serve.health import TrackingProbe, redact

NOW = 1_790_000_000.0


def _row(i: int = 0, **kw: object) -> dict[str, object]:
    """A row as cellscan.edge.score_paths makes it, plus the "time" post_results adds."""
    return {"image": f"/scans/{i}.png", "model_version": 3, "status": "ok", "is_anomaly": i % 2 == 1,
            "anomaly_score": 0.5 + i, "reconstruction_error": 0.1, "threshold": 1.0, "time": NOW - 5} | kw


def _body(rows: list[dict[str, object]], **kw: object) -> dict[str, object]:
    return {"source": "cellscan-edge", "host": "line-3", "model_version": 3, "runtime": "onnx", "records": rows} | kw


def test_rows_are_marked_edge_and_unscored_ones_skipped(tmp_path):
    rows, skipped = edge_rows(_body([_row(0), _row(1), {"image": "/scans/x.png", "model_version": 3, "status": "error",
                                                         "error": "ImageError: truncated", "time": NOW}]), now=NOW)
    assert skipped == 1 and len(rows) == 2
    assert {r["source"] for r in rows} == {"edge"} and rows[0]["batch_id"].startswith("edge-line-3-")
    assert [r["is_anomaly"] for r in rows] == [False, True] and rows[1]["score"] == 1.5
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.db'}", None)
    assert log.insert(rows) == 2
    df = log.frame()
    assert df["source"].tolist() == ["edge", "edge"] and df["model_version"].tolist() == [3, 3]
    assert df["is_anomaly"].tolist() == [0.0, 1.0] and df["name"].tolist() == ["/scans/0.png", "/scans/1.png"]


@pytest.mark.parametrize(("body", "needle"), [
    ([1, 2], "JSON object"),  # not an object
    (_body([_row()], extra=1), "unknown field(s) 'extra'"),  # unknown top-level field
    ({"records": "x"}, "records: expected a list"),
    (_body([_row()] * 1001), "at most 1000"),  # bounded per request
    (_body(["x"]), "records[0]: expected an object"),
    (_body([_row(), _row(anomaly_score=float("nan"))]), "records[1].anomaly_score: expected a finite number"),
    (_body([_row(anomaly_score="1.2")]), "records[0].anomaly_score"),
    (_body([_row(is_anomaly="yes")]), "records[0].is_anomaly"),
    (_body([_row(status="maybe")]), "records[0].status"),
    (_body([_row(colour="red")]), "records[0]: unknown field(s) 'colour'"),
    (_body([_row(time=NOW + 10 * 86400)]), "not in the future"),
    (_body([_row(time=5.0)]), "records[0].time: expected a Unix time after 2020-01-01"),  # a clock left at 1970
    (_body([_row(), _row(1, is_anomaly=False)]), "records[1].is_anomaly: false contradicts anomaly_score 1.5 >"),
    (_body([_row(is_anomaly=True)]), "records[0].is_anomaly: true contradicts anomaly_score 0.5 <= threshold 1"),
    (_body([_row(model_version=0)]), "model version"),
    (_body([_row(model_version=10**30)]), "model version"),  # beyond SQLite's integers
    (_body([_row(anomaly_score=1e308)]), "at most 1e+12 in size"),  # would overflow the batch means
    (_body([_row(anomaly_score=10**400)]), "at most 1e+12 in size"),  # a JSON integer past any float
    (_body([_row()], host="h" * 101), "host"),
])
def test_malformed_bodies_are_refused_whole(body, needle):
    with pytest.raises(EdgeRecordsError) as err:
        edge_rows(body, now=NOW)
    assert needle in str(err.value)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


def test_probe_names_mlflow_when_the_server_is_down_and_recovers():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    probe = TrackingProbe(f"http://user:pw@127.0.0.1:{port}", ttl_s=0)
    assert probe.error() is None
    server.shutdown()
    server.server_close()
    t0 = time.perf_counter()
    problem = probe.error()
    assert problem is not None and "MLflow tracking store" in problem and "refused" in problem.lower()
    assert "pw" not in problem and time.perf_counter() - t0 < 3  # quick, and no password in it
    with socket.socket() as s:  # a closed port
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert TrackingProbe(f"http://127.0.0.1:{closed}").error() is not None


def test_probe_sqlite_and_redact(tmp_path):
    db = tmp_path / "mlflow.db"
    assert TrackingProbe(f"sqlite:///{db}").ok()  # made on first use
    sqlite3.connect(db).execute("create table t (x)").connection.close()
    assert TrackingProbe(f"sqlite:///{db}").ok()
    db.write_bytes(b"not a database at all" * 100)
    assert "sqlite" in (TrackingProbe(f"sqlite:///{db}").error() or "")
    assert redact("postgresql://u:p@db:5432/m") == "postgresql://***@db:5432/m"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
