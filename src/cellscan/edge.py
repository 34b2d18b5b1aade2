"""Score images without TensorFlow: an exported network (ONNX or TFLite) with the bundle's own scoring.

An export directory (written by ``cellscan export``, see :mod:`cellscan.mlops.export`) holds::

    <dir>/model.onnx | model.tflite   the Keras graph only: image (N, H, W, C) -> recon, mask logits
    <dir>/meta.json, map_stats.npz ...  every file of the model bundle except model.keras
    <dir>/export.json                  format, quantization, input shape, source version
    <dir>/parity.json                  how the export compared with the Keras model when it was made

:func:`load_export` returns a :class:`~cellscan.core.bundle.CellscanModel` whose networks run in
onnxruntime (or the LiteRT interpreter) through ``use_backend``: every step after the networks (maps,
statistics, fusion, threshold) is the code the service runs, so verdicts agree. Nothing here imports
TensorFlow or Keras; an edge device needs numpy, scipy, Pillow, PyYAML and onnxruntime (or ai-edge-litert).

Command line (``cellscan-edge``)::

    cellscan-edge score DIR --model EXPORT_DIR [--out results.csv] [--post URL]

``--post`` sends the rows as JSON to URL (see :func:`post_results`).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import logging
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from cellscan.core.bundle import CellscanModel
from cellscan.core.images import IMAGE_SUFFIXES, iter_file_pages
from cellscan.errors import CellscanError, ConfigError, ModelError, describe
from cellscan.files import write_atomic

logger = logging.getLogger(__name__)

EXPORT_INFO, PARITY_FILE = "export.json", "parity.json"
MODEL_FILES = {"onnx": "model.onnx", "tflite": "model.tflite"}
RESULTS_PATH = "/edge/results"  # the service's route (cellscan.serve.edgelog)
FIELDS = ["image", "status", "is_anomaly", "anomaly_score", "reconstruction_error", "threshold", "model_version",
          "error"]


def _pad(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Reflect-pad (N, h, w, C) up to ``shape`` (the export's input size), as the Keras path pads."""
    ph, pw = shape[0] - x.shape[1], shape[1] - x.shape[2]
    if ph < 0 or pw < 0:
        msg = f"image batch {x.shape[1]}x{x.shape[2]} is larger than the export's input {shape[0]}x{shape[1]}"
        raise ConfigError(msg)
    return np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else x


class OnnxBackend:
    """The exported graph in onnxruntime: ``x -> (recon (N, H, W, C), mask logits (N, H, W) or None)``."""

    def __init__(self, path: Path, input_shape: tuple[int, int], threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep instead of spinning: a server shares its cores with the HTTP workers,
        # the batcher and other processes, and spinning threads steal them (measured in benchmarks/serving.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.shape = input_shape

    def raw(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs on an input already at the export's size."""
        return dict(zip(self.outputs, self.session.run(None, {self.input: x}), strict=True))

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        h, w = x.shape[1:3]
        out = self.raw(_pad(x.astype(np.float32, copy=False), self.shape))
        mask = out["mask"][:, :h, :w, 0] if "mask" in out else None
        return out["recon"][:, :h, :w], mask


class OnnxMaps:
    """The export's ``maps.onnx`` in onnxruntime: ``(x, recon, head prob) -> (map, head map or None)``.

    The numpy scoring's maps (:mod:`cellscan.mlops.maps_onnx` builds the graph), for the score
    parameters in ``key``; the model falls back to numpy for others.
    """

    def __init__(self, path: Path, key: dict[str, Any], threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.key = key

    def __call__(self, x: np.ndarray, recon: np.ndarray, prob: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        feed = {"x": x.astype(np.float32, copy=False), "recon": recon.astype(np.float32, copy=False)}
        if "prob" in self.inputs:
            if prob is None:
                msg = "maps graph expects the head's map"
                raise ModelError(msg)
            feed["prob"] = prob.astype(np.float32, copy=False)
        out = self.session.run(None, feed)
        return out[0], (out[1] if len(out) > 1 else None)


class LiteBackend:
    """The exported graph in the LiteRT interpreter (one call at a time: the interpreter is not thread-safe)."""

    def __init__(self, path: Path, input_shape: tuple[int, int], threads: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads or None)
        self.runner = self.interpreter.get_signature_runner()
        self.input = next(iter(self.runner.get_input_details()))
        self.shape = input_shape
        self._lock = threading.Lock()

    def raw(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            return {k: np.array(v) for k, v in self.runner(**{self.input: x}).items()}

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        h, w = x.shape[1:3]
        out = self.raw(_pad(x.astype(np.float32, copy=False), self.shape))
        mask = out["mask"][:, :h, :w, 0] if "mask" in out else None
        return out["recon"][:, :h, :w], mask


def read_info(directory: Path) -> dict[str, Any]:
    """export.json of an export directory.

    Raises:
        ModelError: the directory is not an export (no export.json or no model file).
    """
    info_path = Path(directory) / EXPORT_INFO
    if not info_path.is_file():
        msg = f"not a cellscan export (missing {EXPORT_INFO}; make one with `cellscan export`): {directory}"
        raise ModelError(msg)
    try:
        info: dict[str, Any] = json.loads(info_path.read_text())
        model_file = Path(directory) / info["file"]
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or no "file": a damaged or hand-made file
        msg = f"{info_path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); export the model again"
        raise ModelError(msg) from None
    if not model_file.is_file():
        msg = f"export {directory} lacks its model file {info['file']}"
        raise ModelError(msg)
    return info


def load_export(directory: str | Path, threads: int = 0) -> CellscanModel:
    """A model scoring through the export's runtime (ONNX Runtime or LiteRT), with the bundle's scoring.

    Args:
        directory: an export directory written by ``cellscan export``.
        threads: intra-op threads of the runtime (0: its default).

    Raises:
        ModelError: not an export directory, or its files are unreadable.
    """
    directory = Path(directory)
    info = read_info(directory)
    model = CellscanModel.load_dir(directory, network=False)
    shape = (int(info["input_shape"][0]), int(info["input_shape"][1]))
    backends = {"onnx": OnnxBackend, "tflite": LiteBackend}
    try:
        backend = backends[info["format"]](directory / info["file"], shape, threads)
    except Exception as exc:  # onnxruntime / LiteRT raise their own types for a bad file
        msg = f"cannot load {directory / info['file']}: {exc}"
        raise ModelError(msg) from exc
    model.use_backend(backend)
    if info.get("maps_file") and (directory / info["maps_file"]).is_file():
        try:
            model.use_maps(OnnxMaps(directory / info["maps_file"], info["maps_key"], threads))
        except Exception as exc:  # noqa: BLE001 (a bad maps graph leaves the numpy maps in use)
            logger.warning("export %s: maps graph not used (%s); the maps are computed in numpy", directory, exc)
    model.meta["export"] = info
    return model


def list_folder(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


NON_FINITE = "the image gives a non-finite score; expected finite pixel values"  # the service says it too


def score_paths(model: CellscanModel, paths: list[Path], batch: int = 16) -> list[dict[str, Any]]:
    """One row per image, and per page of a stack (a multi-page TIFF of CT slices, ``<path>#page=K``), with
    the service's answer fields; an unreadable image gets ``status: error``."""
    import itertools

    version = model.meta.get("export", {}).get("source_version")
    rows: list[dict[str, Any]] = []
    entries = iter_file_pages(paths)
    while chunk_entries := list(itertools.islice(entries, batch)):
        good: list[tuple[int, np.ndarray]] = []
        chunk = [{"image": label, "model_version": version} for label, _ in chunk_entries]
        for k, (label, data) in enumerate(chunk_entries):
            try:
                if isinstance(data, Exception):
                    raise data
                good.append((k, model.load_pair(data, name=label)[0]))
            except (CellscanError, OSError) as exc:
                chunk[k] |= {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        if good:
            res = model.score_arrays(np.stack([x for _, x in good]))
            for j, (k, _) in enumerate(good):
                chunk[k] |= res.record(j) | {"status": "ok"}
                if not (np.isfinite(res.scores[j]) and np.isfinite(res.recon_scores[j])):  # as the service
                    chunk[k] |= {"status": "error", "is_anomaly": None, "anomaly_score": None,
                                 "reconstruction_error": None,
                                 "error": f"ImageError: {NON_FINITE}"}
        rows.extend(chunk)
    return rows


def check_out(out_csv: Path) -> None:
    """Refuse, before any image is scored, an --out that cannot be written (a folder, a file's child, a
    read-only place): the results would be lost after minutes of scoring."""
    import os

    parent = next((p for p in (out_csv.parent, *out_csv.parent.parents) if p.exists()), Path())
    if out_csv.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "is a folder" if out_csv.is_dir() else f"cannot be written under {parent}"
        msg = f"--out {out_csv} {what}; expected a CSV file path in a writable folder"
        raise ConfigError(msg)


def write_csv(rows: list[dict[str, Any]], out_csv: Path) -> None:
    """Write the rows whole or not at all (:func:`~cellscan.files.write_atomic`): a full disk never leaves
    half a results.csv."""
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out_csv, table.getvalue())


RETRY_STATUS = (429, 503)  # the service did not take the request: busy, restarting (a 502 / 504 may have)


def post_results(url: str, rows: list[dict[str, Any]], info: dict[str, Any], api_key: str | None = None,
                 chunk: int = 100, timeout: float = 30.0, retries: int = 3, backoff: float = 2.0) -> int:
    """POST the rows as JSON to ``url``, ``chunk`` rows a request; returns the number of requests sent.

    A request the service did not take (connection refused, HTTP 429, 503) is sent again up to ``retries``
    times, ``backoff`` x 1, 2, 4... seconds apart; one that may have been logged (a time-out while waiting
    for the answer, a gateway's 502 or 504) is not, so no row is logged twice.

    ``url`` is the service's address (``http://host:3000``, posted to its ``/edge/results`` route, which
    writes the rows into the prediction log with source ``edge``) or any full URL.

    Each body is ``{"source": "cellscan-edge", "host": ..., "model_version": ..., "runtime": "onnx",
    "records": [<results.csv rows, with "time">]}``; ``api_key`` goes in the ``x-api-key`` header.

    Raises:
        CellscanError: a request failed or was answered with an error status.
    """
    import socket
    from urllib.parse import urlsplit

    check_post_url(url)
    if urlsplit(url).path in ("", "/"):  # the service's address alone: its route for edge results
        url = url.rstrip("/") + RESULTS_PATH
    sent = 0
    stamp = time.time()
    for i in range(0, len(rows), chunk):
        body = {"source": "cellscan-edge", "host": socket.gethostname(), "model_version": info.get("source_version"),
                "runtime": info.get("format"), "records": [r | {"time": stamp} for r in rows[i : i + chunk]]}
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"} | ({"x-api-key": api_key} if api_key else {}))
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (the operator's URL)
                    resp.read()
                break
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if attempt < retries and _not_taken(exc):
                    time.sleep(backoff * 2**attempt)
                    continue
                why = (f"HTTP {exc.code} {exc.read()[:200].decode(errors='replace')}"
                       if isinstance(exc, urllib.error.HTTPError) else f"{type(exc).__name__}: {exc}")
                total = math.ceil(len(rows) / chunk)
                done = f" ({sent} of {total} requests were logged before it)" if sent else ""
                tried = f" after {attempt + 1} attempts" if attempt else ""
                msg = f"posting results to {url}: {why}{tried}{done}"
                raise CellscanError(msg) from None
        sent += 1
    return sent


def _not_taken(exc: BaseException) -> bool:
    """Whether a failed request certainly logged nothing: refused, or answered busy / unavailable."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRY_STATUS
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, ConnectionRefusedError)


def check_post_url(url: str) -> None:
    """Refuse, before any image is scored, a --post address that is not http(s)://host[:port][/path]."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        ok = False
    if not ok:
        msg = f"--post expects the service's address, http(s)://host:port, got {url!r}"
        raise ConfigError(msg)


def main(argv: list[str] | None = None) -> int:
    """``cellscan-edge score DIR --model EXPORT_DIR [--out results.csv] [--post URL]``."""
    ap = argparse.ArgumentParser(prog="cellscan-edge", description="Score images with an exported cellscan model "
                                 "(ONNX Runtime or LiteRT; no TensorFlow).")
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", help="Score every image of DIR (recursively) into results.csv.")
    sc.add_argument("folder", type=Path, help="Folder of images.")
    sc.add_argument("--model", "-m", type=Path, required=True, help="Export directory (cellscan export).")
    sc.add_argument("--out", "-o", type=Path, default=Path("results.csv"), help="Results CSV (default results.csv).")
    sc.add_argument("--post", metavar="URL", help="Also POST the results as JSON to URL (the service's prediction log).")
    sc.add_argument("--api-key", default=None, help="x-api-key header for --post (default: $CELLSCAN_API_KEY).")
    sc.add_argument("--threads", type=int, default=0, help="Runtime threads (0: its default).")
    sc.add_argument("--batch", type=int, default=16, help="Images per model call.")
    args = ap.parse_args(argv)
    try:
        if not args.folder.is_dir():
            msg = f"folder does not exist: {args.folder}"
            raise ConfigError(msg)
        if args.post:
            check_post_url(args.post)  # before minutes of scoring, not after
        check_out(args.out)
        model = load_export(args.model, threads=args.threads)
        paths = list_folder(args.folder)
        if not paths:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            msg = f"{args.folder} holds no images; expected files ending in {suffixes}"
            raise ConfigError(msg)
        t0 = time.perf_counter()
        rows = score_paths(model, paths, max(1, args.batch))
        seconds = time.perf_counter() - t0
        write_csv(rows, args.out)
        ok = [r for r in rows if r.get("status") == "ok"]
        print(f"{len(rows)} images: {len(ok)} scored ({sum(bool(r['is_anomaly']) for r in ok)} anomalies), "
              f"{len(rows) - len(ok)} failed -> {args.out} ({seconds:.2f} s)")
        if args.post:
            import os

            key = args.api_key or os.environ.get("CELLSCAN_API_KEY")
            n = post_results(args.post, rows, model.meta["export"], key)
            print(f"posted {len(rows)} results to {args.post} in {n} request(s)")
    except Exception as exc:  # cellscan's and the system's errors (an --out that cannot be written) in a line
        said = describe(exc)
        if said is None:
            raise
        print(f"{said[0]}: {said[1]}", file=sys.stderr)
        return 1
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
