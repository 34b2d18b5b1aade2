"""MLflow runs that are worth comparing: one run spans one training (or re-evaluation) from start to end.

A run is opened *before* training (:func:`open_run`) and closed after the version is registered
and gated (:func:`close_run`), so its duration is the real one. It is named ``<kind>-<data hash[:8]>``
(``train-c4f531e1``), carries the params (flat for the UI, and ``params.json`` for exact reproduction),
the data version as an MLflow dataset input whose digest is the DVC hash (and ``data.dvc``, so
``cellscan models reproduce`` can restore it), the git commit, per-epoch and evaluation metrics,
plots, a labelled examples image, and the model bundle as the pyfunc ``model``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellscan import __version__
from cellscan.settings import Settings

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from cellscan.core.bundle import CellscanModel
    from cellscan.core.evaluate import Evaluation

logger = logging.getLogger(__name__)

EXPERIMENT = "cellscan"
EVAL_DIR = "evaluation"
DATA_DVC = f"{EVAL_DIR}/data.dvc"
PARAMS_JSON = "params.json"


def client(settings: Settings) -> MlflowClient:
    """Point MLflow at the settings' tracking URI (creating the sqlite folder) and return a client."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def require_store(settings: Settings) -> None:
    """For commands that only read the registry: a sqlite store file that does not exist is a mistyped
    ``MLFLOW_TRACKING_URI`` (or nothing trained yet), said as such, not an empty store made and then
    reported as having no champion.

    Raises:
        RegistryError: the sqlite file is missing.
    """
    from cellscan.errors import RegistryError

    uri = settings.tracking_uri
    path = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(path).is_file():
        msg = (f"no MLflow store at {path} (MLFLOW_TRACKING_URI={uri}): train a model first "
               "(python -m flows.training) or point MLFLOW_TRACKING_URI at the store training wrote")
        raise RegistryError(msg)


def _experiment_id(mc: MlflowClient, settings: Settings, name: str) -> str:
    """Experiment ``name``; with the sqlite store its artifacts go beside the database (mlflow/artifacts)."""
    exp = mc.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if settings.tracking_uri.startswith("sqlite:///"):
        location = (Path(settings.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return str(mc.create_experiment(name, artifact_location=location))


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


@dataclass
class RunInfo:
    run_id: str
    name: str
    experiment_id: str


def run_name(kind: str, data_hash: str | None) -> str:
    return f"{kind}-{(data_hash or 'unversioned')[:8]}"


def open_run(
    settings: Settings,
    kind: str,
    *,
    params: dict[str, Any] | None = None,
    data_hash: str | None = None,
    dvc_file: str | None = None,
    data_root: Path | None = None,
    git_commit: str | None = None,
    name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> RunInfo:
    """Start a run now (before the work it records): tags, params, the dataset input and data.dvc."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag, Param, RunTag

    mc = client(settings)
    exp = _experiment_id(mc, settings, EXPERIMENT)
    name = name or run_name(kind, data_hash)
    tags = {
        "cellscan.kind": kind,
        "cellscan.version": __version__,
        "data_hash": data_hash or "unversioned",
        "git_commit": git_commit or "unknown",
        "mlflow.source.git.commit": git_commit or "unknown",
    } | (extra_tags or {})
    run = mc.create_run(exp, run_name=name, tags=tags)
    rid = run.info.run_id
    if params:
        flat = {f"{g}.{k}": v for g, group in params.items() for k, v in group.items()}
        items = [Param(k, str(v)[:500]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            mc.log_batch(rid, params=items[i : i + 100])
        mc.log_dict(rid, params, PARAMS_JSON)
    if dvc_file:
        mc.log_text(rid, dvc_file, DATA_DVC)
    if data_hash and data_root is not None:
        ds = _dataset(data_root, data_hash)
        mc.log_inputs(rid, [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])])
    mc.log_batch(rid, tags=[RunTag("mlflow.note.content", f"{kind} run on data {data_hash or 'unversioned'}")])
    logger.info("MLflow run %s (%s) started", name, rid)
    return RunInfo(rid, name, exp)


def _dataset(data_root: Path, data_hash: str) -> Any:
    """The dataset as an MLflow dataset: one row per image file; its digest is the DVC hash."""
    import mlflow.data
    import pandas as pd

    from cellscan.core.images import IMAGE_SUFFIXES

    from cellscan.core.data import hidden

    files = sorted(p for p in data_root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(hidden(n) for n in p.relative_to(data_root).parts))
    df = pd.DataFrame({
        "file": [str(p.relative_to(data_root)) for p in files],
        "folder": [str(p.parent.relative_to(data_root)) for p in files],
    })
    with warnings.catch_warnings():  # a local path matches two equivalent source types
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(df, source=str(data_root), name=data_root.name, digest=data_hash[:36])


def close_run(settings: Settings, run: RunInfo, ok: bool = True) -> None:
    """End the run (FINISHED, or FAILED): its end time is after the registration and the gate."""
    client(settings).set_terminated(run.run_id, "FINISHED" if ok else "FAILED")


def epoch_logger(settings: Settings, run: RunInfo) -> Any:
    """A Keras callback logging ``epoch_<name>`` metrics into the run as each epoch ends (live in the UI)."""
    import keras
    from mlflow.entities import Metric

    mc = client(settings)

    class EpochLogger(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            now = int(time.time() * 1000)
            batch = [Metric(f"epoch_{k}", float(v), now, epoch) for k, v in (logs or {}).items()
                     if isinstance(v, int | float) and math.isfinite(float(v))]
            try:
                mc.log_batch(run.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 (tracking trouble must not stop a training)
                logger.warning("epoch metrics not logged: %s", exc)

    return EpochLogger()


def log_training(
    settings: Settings, run: RunInfo, model: CellscanModel, evaluation: Evaluation,
    history: dict[str, list[float]] | None = None, seconds: float | None = None,
) -> dict[str, float]:
    """Evaluation metrics (and the threshold), plots, scores and the examples image; per-epoch ``history``
    too when it was not logged live by :func:`epoch_logger` (pass None then)."""
    from mlflow.entities import Metric

    from cellscan.core import plots

    mc = client(settings)
    now = int(time.time() * 1000)
    metrics = finite(evaluation.metrics)
    batch = [Metric(f"epoch_{k}", float(v), now, step) for k, vals in (history or {}).items()
             for step, v in enumerate(vals) if math.isfinite(v)]
    extra = {"threshold": model.threshold} | ({"train_seconds": seconds} if seconds is not None else {})
    if (evaluation.labels == 1).any() and (evaluation.labels == 0).any():
        extra |= {f"auroc_{d}": v for d, v in evaluation.per_defect().items()}
        extra |= {f"auroc_area_{band.replace('+', '_up')}": m["image_auroc"]
                  for band, m in evaluation.by_area().items()}
    batch += [Metric(k, v, now, 0) for k, v in (metrics | finite(extra)).items()]
    for i in range(0, len(batch), 900):
        mc.log_batch(run.run_id, metrics=batch[i : i + 900])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "roc.png").write_bytes(plots.roc_png(evaluation))
        (t / "score_histogram.png").write_bytes(plots.histogram_png(evaluation))
        (t / "scores.json").write_text(json.dumps({
            "path": [str(p) for p in evaluation.paths], "label": evaluation.labels.tolist(),
            "score": evaluation.scores.tolist(), "defect": evaluation.defects}))
        try:
            from cellscan.mlops.examples import examples_png

            (t / "examples.png").write_bytes(examples_png(model, evaluation))
        except Exception as exc:  # a picture must never fail a training run
            logger.warning("examples image skipped: %s", exc)
        mc.log_artifacts(run.run_id, tmp, artifact_path=EVAL_DIR)
    return metrics


def log_and_register(settings: Settings, run: RunInfo, bundle_dir: Path) -> int:
    """Log the bundle directory as the run's pyfunc ``model`` and register it: the new version number."""
    import mlflow

    from cellscan.mlops.pyfunc import log_bundle

    client(settings)
    with mlflow.start_run(run_id=run.run_id):
        info = log_bundle(bundle_dir, settings.model_name)
        # start_run(run_id=...) ends the run on exit; close_run sets the final end time later.
    version = int(info.registered_model_version)
    logger.info("registered %s version %d (run %s, %s)", settings.model_name, version, run.name, run.run_id)
    return version


def run_summary(settings: Settings, run_id: str) -> dict[str, Any]:
    """What a run recorded: name, times, tags, params, metrics, dataset inputs."""
    mc = client(settings)
    r = mc.get_run(run_id)
    datasets = [{"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source}
                for d in (r.inputs.dataset_inputs if r.inputs else [])]
    return {
        "run_id": run_id, "run_name": r.info.run_name, "status": r.info.status,
        "start_time": r.info.start_time, "end_time": r.info.end_time,
        "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
        "params": dict(r.data.params), "metrics": dict(r.data.metrics), "datasets": datasets,
    }


def load_params_dict(settings: Settings, run_id: str) -> dict[str, Any]:
    """The full params a run logged (``params.json``)."""
    import mlflow

    client(settings)
    return dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/{PARAMS_JSON}"))


def load_dvc_file(settings: Settings, run_id: str) -> str | None:
    """The ``data.dvc`` a run logged, or None when its data was unversioned."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client(settings)
    try:
        return str(mlflow.artifacts.load_text(f"runs:/{run_id}/{DATA_DVC}"))
    except (MlflowException, OSError):
        return None
