"""The original design's server, as a baseline: Flask, one image per request, Keras predict, MSE of the reconstruction.

    python benchmarks/flask_baseline.py MODEL_DIR PORT
"""

from __future__ import annotations

import io
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json

import cellscan.core.model  # noqa: F401  (registers the graph's custom layer)
import httpx
import keras
import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

model_dir, port = sys.argv[1], int(sys.argv[2])
model = keras.models.load_model(os.path.join(model_dir, "model.keras"), compile=False)
meta = json.load(open(os.path.join(model_dir, "meta.json")))
height, width = meta["input_shape"]
threshold = float(meta["threshold"])
app = Flask(__name__)


@app.post("/predict")
def predict():  # type: ignore[no-untyped-def]
    url = request.get_json()["image_url"]
    img = Image.open(io.BytesIO(httpx.get(url, timeout=10).content)).convert("L").resize((width, height))
    x = np.asarray(img, dtype=np.float32)[None, ..., None] / 255.0
    recon = model.predict(x, verbose=0)["recon"]
    err = float(np.mean((x - recon) ** 2))
    return jsonify({"is_anomaly": err > threshold, "reconstruction_error": err})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=port, threaded=True)
