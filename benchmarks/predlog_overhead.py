"""Cost of the prediction log on /predict's path and off it (sqlite, 128x128 16-bit slices).

    python -m benchmarks.predlog_overhead [--n 500]

On the request path the service only computes the embedding inside the model call (numpy on the
batch's outputs) and queues an item; the descriptors, the hash, the kept image and the insert happen
in the log's thread. Prints milliseconds per image for each part.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cellscan.core.images import encode_png
from cellscan.core.synth import render_slice
from cellscan.mlops.monitor.descriptors import embed
from cellscan.mlops.monitor.predlog import Item, LogWriter, PredictionLog


def main(n: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    xs = [render_slice(rng, 128, None)[0][..., None].astype(np.float32) for _ in range(32)]
    blobs = [encode_png(x[..., 0], 16) for x in xs]
    rec = {"anomaly_score": 0.1, "reconstruction_error": 0.1, "threshold": 1.0, "is_anomaly": False}
    x = np.stack(xs)
    t = time.perf_counter()
    for _ in range(max(1, n // 32)):
        emb = embed(x, x[..., 0])
    embed_ms = 1000 * (time.perf_counter() - t) / (32 * max(1, n // 32))
    with tempfile.TemporaryDirectory() as tmp:
        log = PredictionLog(f"sqlite:///{tmp}/p.db", Path(tmp) / "images", keep_days=30)
        writer = LogWriter(log)
        items = [Item(xs[i % 32], blobs[i % 32], rec, emb[i % 32], "upload", "x.png", 1, 0.05) for i in range(n)]
        t = time.perf_counter()
        for it in items:
            writer.submit(it)
        submit_ms = 1000 * (time.perf_counter() - t) / n
        writer.flush()
        total_ms = 1000 * (time.perf_counter() - t) / n
        writer.close()
    out = {"embed_ms_per_image": embed_ms, "submit_ms_per_image": submit_ms,
           "writer_ms_per_image (off the request path)": total_ms}
    for k, v in out.items():
        print(f"{k:45s} {v:8.3f}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=500)
    main(ap.parse_args().n)
