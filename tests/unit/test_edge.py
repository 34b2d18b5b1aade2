"""cellscan-edge: scores without TensorFlow, with the Keras model's verdicts, and posts its rows as JSON."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cellscan.core.bundle import CellscanModel
from cellscan.edge import list_folder, main
from cellscan.mlops.export import export_model

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("tensorflow", "keras", "tf2onnx", "mlflow", "sklearn", "torch", "jax")


@pytest.fixture(scope="module")
def onnx_export(trained, model_dir: Path, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "onnx"
    export_model(CellscanModel.load_dir(model_dir), out, "onnx", data_root=dataset_dir)
    return out


def test_edge_scores_without_tensorflow_and_agrees_with_keras(onnx_export, model_dir, dataset_dir, tmp_path):
    folder = dataset_dir / "test"
    out_csv = tmp_path / "results.csv"
    code = ("import json, sys\nfrom cellscan.edge import main\n"
            f"rc = main(['score', {str(folder)!r}, '--model', {str(onnx_export)!r}, '--out', {str(out_csv)!r}])\n"
            f"print(json.dumps({{'rc': rc, 'heavy': sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})}}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}

    paths = list_folder(folder)
    keras = CellscanModel.load_dir(model_dir).score_images(paths)
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    assert [r["is_anomaly"] == "True" for r in rows] == keras.is_anomaly.tolist()
    assert max(abs(float(r["anomaly_score"]) - s) for r, s in zip(rows, keras.scores, strict=True)) < 1e-3
    assert any(r["is_anomaly"] == "True" for r in rows) and all(r["status"] == "ok" for r in rows)


class _Sink(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers["content-length"])
        _Sink.bodies.append(json.loads(self.rfile.read(n)) | {"key": self.headers.get("x-api-key")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


def test_edge_posts_results_and_reports_bad_images(onnx_export, dataset_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((dataset_dir / "test" / "good").glob("*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    from PIL import Image

    first, second = (Image.open(p) for p in sorted((dataset_dir / "test" / "good").glob("*.png"))[:2])  # 2 slices
    first.save(folder / "volume.tif", format="TIFF", save_all=True, append_images=[second])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/log"
    try:
        rc = main(["score", str(folder), "--model", str(onnx_export), "--out", str(tmp_path / "r.csv"),
                   "--post", url, "--api-key", "k"])
    finally:
        server.shutdown()
    assert rc == 1  # one image could not be read
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    bad = [r for r in rows if r["status"] == "error"]
    assert len(rows) == 6 and len(bad) == 1 and "broken.png" in bad[0]["image"] and "not an image" in bad[0]["error"]
    score = {Path(r["image"]).name: float(r["anomaly_score"]) for r in rows if r["status"] == "ok"}
    pngs = sorted(n for n in score if n.endswith(".png"))
    for k, name in enumerate(pngs[:2], 1):  # each slice of the stack scores as its own file
        assert score[f"volume.tif#page={k}"] == pytest.approx(score[name], rel=1e-5)
    (body,) = _Sink.bodies
    assert body["source"] == "cellscan-edge" and body["runtime"] == "onnx" and body["key"] == "k"
    ok = [r for r in body["records"] if r["status"] == "ok"]
    assert len(body["records"]) == 6 and len(ok) == 5
    assert {"image", "is_anomaly", "anomaly_score", "threshold", "model_version", "time"} <= set(ok[0])
    assert "posted 6 results" in capsys.readouterr().out


def test_edge_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    assert main(["score", str(tmp_path / "imgs"), "--model", str(tmp_path)]) == 1
    assert "not a cellscan export" in capsys.readouterr().err


def test_edge_refuses_a_bad_post_address_or_a_damaged_export_in_one_line(onnx_export, tmp_path, capsys):
    import shutil

    (tmp_path / "imgs").mkdir()
    for url in ("host-without-scheme:3000", "ftp://host/x", "http://", "http://host:port"):
        assert main(["score", str(tmp_path / "imgs"), "--model", str(onnx_export), "--post", url]) == 1
        err = capsys.readouterr().err
        expected = f"ConfigError: --post expects the service's address, http(s)://host:port, got {url!r}"
        assert err.startswith(expected), err
    damaged = tmp_path / "export"
    shutil.copytree(onnx_export, damaged)
    (damaged / "export.json").write_text("{not json")
    assert main(["score", str(tmp_path / "imgs"), "--model", str(damaged)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ModelError: "), err
    assert "export.json is damaged" in err


class _Busy(BaseHTTPRequestHandler):
    """Answers 503 (a service restarting) to the first request, then takes the rest."""
    seen: list[int] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _Busy.seen.append(len(body["records"]))
        self.send_response(503 if len(_Busy.seen) == 1 else 204)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


def test_edge_posting_retries_a_busy_service_once_per_chunk_and_logs_nothing_twice():
    from cellscan.edge import post_results

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = [{"image": f"{i}.png", "status": "ok"} for i in range(150)]
    try:
        sent = post_results(f"http://127.0.0.1:{server.server_address[1]}", rows, {}, backoff=0.01)
    finally:
        server.shutdown()
    assert sent == 2
    assert _Busy.seen == [100, 100, 50]  # the refused first chunk again, then the second once


def test_edge_posting_to_something_that_is_not_http_is_one_line_not_a_traceback(onnx_export, dataset_dir,
                                                                                tmp_path, capsys):
    import socket

    from cellscan.edge import post_results
    from cellscan.errors import CellscanError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def garbage() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.close()

    threading.Thread(target=garbage, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(CellscanError, match=f"posting results to {url}/edge/results: BadStatusLine"):
        post_results(url, [{"image": "a.png", "status": "ok"}], {}, backoff=0.01)
    listener.close()


def test_edge_refuses_an_unwritable_out_or_a_folder_without_images_before_scoring(onnx_export, dataset_dir,
                                                                                  tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "notes.dcm").write_bytes(b"DICM")
    assert main(["score", str(imgs), "--model", str(onnx_export), "--out", str(tmp_path / "r.csv")]) == 1
    assert "holds no images; expected files ending in .bmp, .jpeg" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()
    (imgs / "a.png").write_bytes(next((dataset_dir / "test" / "good").glob("*.png")).read_bytes())
    (tmp_path / "file").write_text("x")
    for out, why in ((tmp_path, "is a folder"), (tmp_path / "file" / "r.csv", "cannot be written under")):
        assert main(["score", str(imgs), "--model", str(onnx_export), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"ConfigError: --out {out} {why}"), err
    (tmp_path / "r.csv").write_text("earlier results\n")
    assert main(["score", str(imgs), "--model", str(onnx_export), "--out", str(tmp_path / "r.csv")]) == 0
    assert [r["status"] for r in csv.DictReader((tmp_path / "r.csv").open())] == ["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "imgs", "r.csv"]  # no partial file left


def test_edge_marks_a_non_finite_score_as_an_error_the_service_skips(onnx_export, dataset_dir, monkeypatch):
    import numpy as np

    from cellscan.core.bundle import ScoreResult
    from cellscan.edge import load_export, score_paths
    from cellscan.serve.edgelog import edge_rows

    model = load_export(onnx_export)
    real = model.score_arrays

    def nan_first(x):  # noqa: ANN001, ANN202 - what a pixel range the networks never saw can give
        r = real(x)
        return ScoreResult(np.r_[np.nan, r.scores[1:]], r.recon_scores, r.maps, r.recon, r.threshold)

    monkeypatch.setattr(model, "score_arrays", nan_first)
    rows = score_paths(model, sorted((dataset_dir / "test" / "good").glob("*.png"))[:3])
    assert [r["status"] for r in rows] == ["error", "ok", "ok"]
    assert rows[0]["anomaly_score"] is None and rows[0]["is_anomaly"] is None
    assert rows[0]["error"] == "ImageError: the image gives a non-finite score; expected finite pixel values"
    logged, skipped = edge_rows({"records": [r | {"time": None} for r in rows]})
    assert skipped == 1 and len(logged) == 2
