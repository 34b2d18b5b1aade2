"""Evidently 0.7 drift reports: the newest predictions of a version against that version's reference.

One report, four kinds of test (Evidently tests, read from their statuses):

- descriptor drift: :class:`DataDriftPreset` over the descriptors and the geometry (K-S per column at
  ``monitor.p_value``); its drifted-share test fails when ``monitor.drift_share`` of the columns drifted;
- embedding drift: :class:`EmbeddingsDrift` (ratio method: share of the 8 components whose K-S test
  drifted) with a test that fails at ``monitor.embedding_share``;
- prediction drift: :class:`ValueDrift` of the score (K-S);
- anomaly rate: :class:`MeanValue` of the verdict, failing above the reference rate + ``rate_z`` standard
  errors + 1/n (an anomaly-rate jump).

The K-S method is fixed (Evidently would switch to a Wasserstein distance above 1,000 rows, where a
p-value threshold means nothing). Reports are saved as ``<dir>/reports/<stamp>.html|json`` and copied to
``latest.html|json`` (what the service serves), with batch and day metrics in the JSON.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellscan.files import write_atomic
from cellscan.mlops.monitor.descriptors import DESCRIPTORS, EMBEDDING, GEOMETRY

if TYPE_CHECKING:
    import pandas as pd

    from cellscan.core.config import MonitorParams
    from cellscan.settings import Settings

logger = logging.getLogger(__name__)

EXPERIMENT = "monitoring"
LATEST_HTML, LATEST_JSON = "latest.html", "latest.json"
# Stamped reports kept in the folder (about 4 MB each: Evidently inlines its scripts); every report also
# stays in its MLflow run, so the folder only needs the recent ones (two days at the hourly default).
KEEP_REPORTS = 48
COLUMNS: tuple[str, ...] = (*DESCRIPTORS, *GEOMETRY)


@dataclass
class DriftResult:
    """What a report found; ``drifted`` names the columns (descriptors, ``embedding``, ``score``)."""

    drift: bool
    rate_jump: bool
    drifted: list[str]
    anomaly_rate: float
    max_rate: float
    reference_rate: float
    n_current: int
    n_reference: int
    model_version: int | None
    tests: list[dict[str, Any]] = field(default_factory=list)
    html: str | None = None
    json: str | None = None
    created: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        return asdict(self)


def max_rate(reference_rate: float, n: int, z: float) -> float:
    """Highest anomaly rate still consistent with the reference's on ``n`` images.

    Example:
        >>> round(max_rate(0.01, 100, 3.0), 4)   # 1% + 3 * sqrt(0.01 * 0.99 / 100) + 1 / 100
        0.0498
    """
    r = max(reference_rate, 0.01)
    return min(1.0, r + z * math.sqrt(r * (1 - r) / max(n, 1)) + 1 / max(n, 1))


def with_pixels(df: pd.DataFrame) -> pd.DataFrame:
    """The rows scored from pixels here: edge devices' rows (``/edge/results``) carry a score and a verdict but
    no descriptors or embedding, and the report's tests need every column of every row."""
    return df[df[[*COLUMNS, *EMBEDDING]].notna().all(axis=1)]


def _usable(df: pd.DataFrame) -> pd.DataFrame:
    return with_pixels(df)[[*COLUMNS, *EMBEDDING, "score", "is_anomaly"]].astype(float)


def run_report(reference: pd.DataFrame, current: pd.DataFrame, p: MonitorParams,
               model_version: int | None = None) -> tuple[Any, DriftResult]:
    """Build and run the report: (Evidently snapshot, result read from its tests)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, MeanValue, ValueDrift
    from evidently.metrics.embeddings import RatioDriftMethod  # noqa: F401 (the method's type)
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import ratio
    from evidently.presets import DataDriftPreset
    from evidently.tests import lt, lte

    ref, cur = _usable(reference), _usable(current)
    ref_rate = float(ref["is_anomaly"].mean()) if len(ref) else 0.0
    top = max_rate(ref_rate, len(cur), p.rate_z)
    dd = DataDefinition(numerical_columns=[*COLUMNS, *EMBEDDING, "score", "is_anomaly"],
                        embeddings={"embedding": list(EMBEDDING)})
    report = Report([
        DataDriftPreset(columns=list(COLUMNS), drift_share=p.drift_share, num_method="ks", threshold=p.p_value),
        EmbeddingsDrift(embeddings_name="embedding",
                        drift_method=ratio(component_stattest="ks", component_stattest_threshold=p.p_value,
                                           threshold=p.embedding_share),
                        tests=[lt(p.embedding_share)]),
        ValueDrift(column="score", method="ks", threshold=p.p_value),
        MeanValue(column="is_anomaly", tests=[lte(top)]),
    ], include_tests=True)
    snap = report.run(current_data=Dataset.from_pandas(cur, data_definition=dd),
                      reference_data=Dataset.from_pandas(ref, data_definition=dd))
    tests = _tests(json.loads(snap.json()))
    failed = [t for t in tests if t["status"] == "FAIL"]
    drifted = [t["column"] for t in failed if t["kind"] in ("column", "embedding", "score")]
    share_failed = any(t["kind"] == "descriptor_share" for t in failed)
    drift = share_failed or any(t["kind"] in ("embedding", "score") for t in failed)
    rate = float(cur["is_anomaly"].mean()) if len(cur) else 0.0
    result = DriftResult(drift, any(t["kind"] == "anomaly_rate" for t in failed), drifted, rate, top, ref_rate,
                         len(cur), len(ref), model_version, tests)
    return snap, result


def _tests(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Evidently's tests as {kind, column, status, name, description}."""
    out = []
    for t in raw.get("tests", []):
        params = (t.get("metric_config") or {}).get("params") or {}
        typ = params.get("type", "").rsplit(":", 1)[-1]
        column = params.get("column") or params.get("embeddings_name")
        kind = {"DriftedColumnsCount": "descriptor_share", "EmbeddingsDrift": "embedding",
                "MeanValue": "anomaly_rate"}.get(typ, "column")
        if typ == "ValueDrift" and column == "score":
            kind = "score"
        out.append({"kind": kind, "column": column, "status": t.get("status"), "name": t.get("name"),
                    "description": t.get("description")})
    return out


def save_report(snap: Any, result: DriftResult, folder: Path, extra: dict[str, Any] | None = None) -> DriftResult:
    """Write ``<stamp>.html`` and ``<stamp>.json`` (our summary + Evidently's), then ``latest.*``."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(result.created))
    html, js = folder / f"report-{stamp}.html", folder / f"report-{stamp}.json"
    snap.save_html(str(html))
    result.html, result.json = str(html), str(js)
    js.write_text(json.dumps({"summary": result.view(), **(extra or {}), "evidently": json.loads(snap.json())},
                             indent=1, default=str))
    write_atomic(folder / LATEST_HTML, html.read_bytes())
    write_atomic(folder / LATEST_JSON, js.read_bytes())
    prune_reports(folder)
    return result


def prune_reports(folder: Path, keep: int = KEEP_REPORTS) -> int:
    """Delete all but the newest ``keep`` stamped reports (html and json; ``latest.*`` stay); returns how many
    reports went."""
    stamps = sorted({p.name.removeprefix("report-").rsplit(".", 1)[0] for p in folder.glob("report-*.*")})
    old = stamps[:-keep] if keep > 0 else stamps
    for stamp in old:
        for suffix in (".html", ".json"):
            (folder / f"report-{stamp}{suffix}").unlink(missing_ok=True)
    return len(old)


def log_to_mlflow(settings: Settings, result: DriftResult, extra_files: dict[str, str] | None = None) -> str:
    """A run in the ``monitoring`` experiment, tagged with the model version: metrics, the report files."""
    from mlflow.entities import Metric, RunTag

    from cellscan.mlops.tracking import _experiment_id, client

    mc = client(settings)
    exp = _experiment_id(mc, settings, EXPERIMENT)
    tags = {"model_version": str(result.model_version), "drift": str(result.drift).lower(),
            "anomaly_rate_jump": str(result.rate_jump).lower(), "drifted_columns": ",".join(result.drifted)[:5000]}
    run = mc.create_run(exp, run_name=f"monitor-v{result.model_version}", tags=tags)
    rid, now = run.info.run_id, int(time.time() * 1000)
    metrics = {"n_current": result.n_current, "n_reference": result.n_reference, "anomaly_rate": result.anomaly_rate,
               "anomaly_rate_max": result.max_rate, "n_drifted": len(result.drifted), "drift": float(result.drift)}
    mc.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                 tags=[RunTag("mlflow.note.content", f"drifted: {', '.join(result.drifted) or 'none'}")])
    for path in (result.html, result.json, *(extra_files or {}).values()):
        if path:
            mc.log_artifact(rid, path, artifact_path="report")
    mc.set_terminated(rid, "FINISHED")
    return str(rid)
