"""Each registered version's reference: what its validation normals look like to it.

At registration (:func:`cellscan.mlops.steps.register`) the version's validation normals are scored once
more and their descriptors, embedding, scores and verdicts are logged into the version's run as
``monitoring/reference.csv`` (one row per image, the prediction log's columns) with a summary
``monitoring/reference.json`` (score quantiles, anomaly rate). The drift monitor compares the newest
predictions of a version with that version's reference.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellscan.mlops.monitor.descriptors import DESCRIPTORS, EMBEDDING, describe, embed, header

if TYPE_CHECKING:
    import pandas as pd

    from cellscan.core.bundle import CellscanModel
    from cellscan.settings import Settings

logger = logging.getLogger(__name__)

REF_DIR = "monitoring"
REF_CSV, REF_JSON = f"{REF_DIR}/reference.csv", f"{REF_DIR}/reference.json"


def frame_for(model: CellscanModel, paths: list[Path], max_pixels: int = 50_000_000) -> pd.DataFrame:
    """Score images and describe them as the prediction log does (one row per image)."""
    import pandas as pd

    from cellscan.core.images import load_batch

    x = load_batch(paths, size=model.shape, channels=model.channels, max_pixels=max_pixels)
    res = model.score_arrays(x)
    df = pd.DataFrame(describe(x), columns=list(DESCRIPTORS))
    df[list(EMBEDDING)] = embed(res.recon, res.maps)
    geo = [header(p.read_bytes()) for p in paths]
    df["height"], df["width"], df["bit_depth"] = ([g[i] for g in geo] for i in range(3))
    df["score"] = res.scores.astype(float)
    df["is_anomaly"] = res.is_anomaly.astype(float)
    df["name"] = [p.name for p in paths]
    return df


def summary(df: pd.DataFrame, threshold: float) -> dict[str, Any]:
    q = np.quantile(df["score"], [0.01, 0.1, 0.5, 0.9, 0.99]) if len(df) else [float("nan")] * 5
    return {"n": len(df), "threshold": threshold, "anomaly_rate": float(df["is_anomaly"].mean()) if len(df) else 0.0,
            "score_quantiles": dict(zip(["p01", "p10", "p50", "p90", "p99"], map(float, q), strict=True)),
            "score_mean": float(df["score"].mean()) if len(df) else float("nan")}


def log_reference(settings: Settings, run_id: str, model: CellscanModel, normals: list[Path],
                  max_pixels: int = 50_000_000) -> dict[str, Any]:
    """Compute the reference on ``normals`` (the validation normals) and log it into the run."""
    from cellscan.mlops.tracking import client

    df = frame_for(model, normals, max_pixels)
    info = summary(df, model.threshold)
    with tempfile.TemporaryDirectory() as tmp:
        df.to_csv(Path(tmp) / "reference.csv", index=False)
        (Path(tmp) / "reference.json").write_text(json.dumps(info, indent=2))
        client(settings).log_artifacts(run_id, tmp, artifact_path=REF_DIR)
    logger.info("reference: %d validation normals, anomaly rate %.3f", info["n"], info["anomaly_rate"])
    return info


def load_reference(settings: Settings, version: int) -> pd.DataFrame:
    """The reference a version was registered with.

    Raises:
        RegistryError: the version does not exist or was registered without a reference.
    """
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from cellscan.errors import RegistryError
    from cellscan.mlops.registry import not_found
    from cellscan.mlops.tracking import client

    mc = client(settings)
    try:
        mv = mc.get_model_version(settings.model_name, str(version))
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=REF_CSV, dst_path=tmp)
            return pd.read_csv(path)
    except (MlflowException, OSError) as exc:  # requests' errors are OSErrors: an artifact server's 404
        status = getattr(getattr(exc, "response", None), "status_code", None)
        missing = not_found(exc) if isinstance(exc, MlflowException) else (
            isinstance(exc, FileNotFoundError) or status == 404)
        if not missing:  # a store that does not answer is said as such, not as "no reference"
            raise
        msg = f"version {version} of {settings.model_name!r} has no reference ({REF_CSV} in its run)"
        raise RegistryError(msg) from None
