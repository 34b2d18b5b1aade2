"""MLflow tracking and the model registry: log runs, register versions, champion and rollback.

Each training run logs params, per-epoch metrics, evaluation metrics, the threshold, the data
version (DVC hash) and git commit, plots and example heatmaps, the Keras model (``mlflow.keras``
flavour, registered as a new version of ``cellscan``) and a ``bundle/`` artifact with the score
metadata (threshold, map statistics). The alias ``champion`` marks the serving version; a new
version gets ``challenger`` and is promoted only when the gate in params says it is not worse.
Aliases move only after a version is completely registered, so a failed run never touches them.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellscan import __version__
from cellscan.core.bundle import META_FILE, STATS_FILE, CellscanModel
from cellscan.core.config import GateParams
from cellscan.settings import Settings
from cellscan.errors import RegistryError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from cellscan.core.evaluate import Evaluation
    from cellscan.core.train import TrainResult

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "cellscan.champion_history"
PIP_REQUIREMENTS = ["tensorflow-cpu==2.21.0", "keras==3.15.1", "numpy==2.4.6"]



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


def _experiment(mc: MlflowClient, settings: Settings, name: str) -> None:
    """Use experiment ``name``; with the sqlite store its artifacts go beside the database (mlflow/artifacts)."""
    import mlflow

    if mc.get_experiment_by_name(name) is None:
        location = None
        if settings.tracking_uri.startswith("sqlite:///"):
            location = (Path(settings.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        mc.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


@dataclass
class Registered:
    version: int
    run_id: str
    metrics: dict[str, float]


def log_and_register(
    settings: Settings,
    model: CellscanModel,
    evaluation: Evaluation,
    *,
    history: dict[str, list[float]] | None = None,
    params_flat: dict[str, Any] | None = None,
    data_hash: str | None = None,
    dvc_file: str | None = None,
    git_commit: str | None = None,
    run_name: str | None = None,
    kind: str = "train",
    experiment: str = "cellscan",
) -> Registered:
    """Log one run and register its model as a new version (aliases untouched)."""
    import mlflow
    from mlflow.models import infer_signature

    from cellscan.core import plots

    mc = client(settings)
    _experiment(mc, settings, experiment)
    metrics = _finite(evaluation.metrics)
    tags = {
        "cellscan.kind": kind,
        "cellscan.version": __version__,
        "data_hash": data_hash or "unversioned",
        "git_commit": git_commit or "unknown",
    }
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        if params_flat:
            mlflow.log_params({k: str(v)[:250] for k, v in params_flat.items()})
        for name, values in (history or {}).items():
            for step, v in enumerate(values):
                mlflow.log_metric(f"epoch_{name}", v, step=step)
        mlflow.log_metrics(metrics)
        if (evaluation.labels == 1).any():
            mlflow.log_metrics({f"auroc_{d}": v for d, v in evaluation.per_defect().items()})
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            (t / "roc.png").write_bytes(plots.roc_png(evaluation))
            (t / "score_histogram.png").write_bytes(plots.histogram_png(evaluation))
            (t / "scores.json").write_text(json.dumps({
                "path": [str(p) for p in evaluation.paths], "label": evaluation.labels.tolist(),
                "score": evaluation.scores.tolist(), "defect": evaluation.defects}))
            examples = _examples(model, evaluation)
            if examples is not None:
                (t / "examples.png").write_bytes(examples)
            if dvc_file:
                (t / "data.dvc").write_text(dvc_file)
            mlflow.log_artifacts(tmp, artifact_path="evaluation")
            bundle = t / "bundle"
            bundle.mkdir()
            (bundle / META_FILE).write_text(json.dumps(model.meta | {"data_hash": data_hash}, indent=2, default=str))
            if model.stats is not None:
                np.savez(bundle / STATS_FILE, **model.stats.to_arrays())
            mlflow.log_artifacts(str(bundle), artifact_path="bundle")
        x = np.zeros((1, model.image_size, model.image_size, model.channels), np.float32)
        info = mlflow.keras.log_model(
            model.keras_model,
            name="model",
            signature=infer_signature(x, x),
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=settings.model_name,
        )
        version = int(info.registered_model_version)
    for k, v in ({"threshold": model.threshold, "data_hash": data_hash or "unversioned", "kind": kind}
                 | {f"metric.{k}": v for k, v in metrics.items()}).items():
        mc.set_model_version_tag(settings.model_name, str(version), k, str(v))
    logger.info("registered %s version %d (run %s)", settings.model_name, version, run.info.run_id)
    return Registered(version, run.info.run_id, metrics)


def _examples(model: CellscanModel, ev: Evaluation, n: int = 4) -> bytes | None:
    from cellscan.core.images import load_batch
    from cellscan.core.plots import strip_png

    idx = list(np.argsort(-ev.scores)[:n])
    if not idx:
        return None
    x = load_batch([ev.paths[i] for i in idx], size=model.image_size, channels=model.channels)
    res = model.score_arrays(x)
    return strip_png(x, res.recon, res.maps)


# -- reading the registry ---------------------------------------------------------------------
def _aliases(mc: MlflowClient, name: str) -> dict[str, int]:
    from mlflow.exceptions import MlflowException

    try:
        rm = mc.get_registered_model(name)
    except MlflowException:
        return {}
    return {alias: int(v) for alias, v in (rm.aliases or {}).items()}


def champion_version(settings: Settings) -> int | None:
    return _aliases(client(settings), settings.model_name).get(CHAMPION)


def _resolve(mc: MlflowClient, name: str, ref: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        if isinstance(ref, int) or str(ref).isdigit():
            return mc.get_model_version(name, str(ref))
        return mc.get_model_version_by_alias(name, str(ref))
    except MlflowException:
        msg = f"model {name!r} has no version or alias {ref!r}"
        raise RegistryError(msg) from None


def load_model(settings: Settings, ref: int | str = CHAMPION) -> tuple[CellscanModel, int]:
    """Load a registered version (number or alias) with its score bundle: (model, version).

    The Keras weights come from ``models:/<name>/<version>`` (the ``mlflow.keras`` flavour).
    """
    import mlflow

    mc = client(settings)
    mv = _resolve(mc, settings.model_name, ref)
    import cellscan.core.losses  # noqa: F401  (registers the loss the saved model names)

    keras_model = mlflow.keras.load_model(
        f"models:/{settings.model_name}/{mv.version}", load_model_kwargs={"compile": False}
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="bundle", dst_path=tmp))
        meta = json.loads((local / META_FILE).read_text())
        stats = None
        if (local / STATS_FILE).is_file():
            from cellscan.core.scoring import MapStats

            with np.load(local / STATS_FILE) as z:
                stats = MapStats.from_arrays({k: z[k] for k in z.files})
    meta["registry_version"] = int(mv.version)
    return CellscanModel(keras_model, meta, stats), int(mv.version)


def list_versions(settings: Settings) -> list[dict[str, Any]]:
    """Every version, newest first, with its aliases, metrics, threshold and data hash."""
    mc = client(settings)
    name = settings.model_name
    by_version: dict[int, list[str]] = {}
    for alias, v in _aliases(mc, name).items():
        by_version.setdefault(v, []).append(alias)
    rows = []
    for mv in mc.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(by_version.get(int(mv.version), [])),
            "kind": tags.get("kind", ""),
            "threshold": float(tags.get("threshold", "nan")),
            "image_auroc": float(tags.get("metric.image_auroc", "nan")),
            "f1": float(tags.get("metric.f1", "nan")),
            "data_hash": tags.get("data_hash", ""),
            "gate": tags.get("gate", ""),
            "run_id": mv.run_id,
            "created": int(mv.creation_timestamp or 0),
        })
    return sorted(rows, key=lambda r: -r["version"])


# -- moving aliases ---------------------------------------------------------------------------
def _history(mc: MlflowClient, name: str) -> list[int]:
    rm = mc.get_registered_model(name)
    return [int(v) for v in json.loads((rm.tags or {}).get(HISTORY_TAG, "[]"))]


def promote(settings: Settings, version: int, reason: str = "manual") -> int | None:
    """Make ``version`` the champion; returns the previous champion (kept in the history)."""
    mc = client(settings)
    name = settings.model_name
    _resolve(mc, name, version)
    previous = _aliases(mc, name).get(CHAMPION)
    if previous == version:
        return previous
    mc.set_registered_model_alias(name, CHAMPION, str(version))
    if previous is not None:
        hist = _history(mc, name) + [previous]
        mc.set_registered_model_tag(name, HISTORY_TAG, json.dumps(hist[-50:]))
    if _aliases(mc, name).get(CHALLENGER) == version:
        mc.delete_registered_model_alias(name, CHALLENGER)
    mc.set_model_version_tag(name, str(version), "promoted", reason)
    logger.info("champion: version %s -> %s (%s)", previous, version, reason)
    return previous


def rollback(settings: Settings, version: int | None = None) -> int:
    """Move ``champion`` back: to ``version``, or without one to the previous champion.

    Raises:
        RegistryError: no earlier champion is recorded, or the version does not exist.
    """
    mc = client(settings)
    name = settings.model_name
    current = _aliases(mc, name).get(CHAMPION)
    hist = _history(mc, name) if current is not None else []
    if version is None:
        candidates = [v for v in hist if v != current]
        if not candidates:
            msg = f"no previous champion of {name!r} to roll back to (current: {current})"
            raise RegistryError(msg)
        version = candidates[-1]
        hist = hist[: len(hist) - 1 - hist[::-1].index(version)]
    _resolve(mc, name, version)
    mc.set_registered_model_alias(name, CHAMPION, str(version))
    mc.set_registered_model_tag(name, HISTORY_TAG, json.dumps(hist))
    mc.set_model_version_tag(name, str(version), "promoted", f"rollback from {current}")
    logger.info("rollback: champion %s -> %s", current, version)
    return version


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    challenger: int
    champion: int | None
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)


def gate(settings: Settings, registered: Registered, champion_metrics: dict[str, float] | None,
         rule: GateParams) -> GateDecision:
    """Mark the new version challenger; promote it when it is not worse than the champion.

    ``champion_metrics`` are the champion's metrics on the *same* evaluation data (None when there
    is no champion yet).
    """
    mc = client(settings)
    name = settings.model_name
    current = _aliases(mc, name).get(CHAMPION)
    mc.set_registered_model_alias(name, CHALLENGER, str(registered.version))
    new = registered.metrics
    if current is None or champion_metrics is None:
        ok, reason = True, "no champion yet"
    else:
        worse = [
            f"{m} {new.get(m, float('nan')):.4f} < champion {champion_metrics[m]:.4f}"
            for m in rule.names
            if m in champion_metrics and not new.get(m, float("-inf")) >= champion_metrics[m] - rule.tolerance
        ]
        ok = not worse
        reason = "not worse on " + ", ".join(rule.names) if ok else "worse: " + "; ".join(worse)
    mc.set_model_version_tag(name, str(registered.version), "gate", ("promoted: " if ok else "rejected: ") + reason)
    if ok:
        promote(settings, registered.version, reason)
    else:
        logger.warning("version %d stays challenger: %s", registered.version, reason)
    return GateDecision(ok, reason, registered.version, current, new, champion_metrics or {})
