"""Prefect flow: score a folder (or a DVC-tracked set) with the champion; results.csv, metrics, an HTML
summary with the flagged images' heatmaps, every prediction in the prediction log; the run in MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cellscan.core.data import folder_images
from cellscan.errors import describe
from cellscan.mlops import batchscore, versioning
from flows.common import context


@task(name="dvc-pull", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def dvc_pull(root: Path, target: str) -> None:
    versioning.dvc("pull", target, cwd=root)  # DVC's reason in a VersioningError (-q would keep it back)


@task(name="score-folder", cache_policy=NO_CACHE)
def score(settings: Any, folder: Path, out: Path, model: str) -> dict[str, Any]:
    return batchscore.score_folder(settings, folder, out, model)


@task(name="log-batch-run", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def log_run(settings: Any, folder: Path, out: Path, result: dict[str, Any]) -> str:
    from mlflow.entities import Metric

    from cellscan.mlops.tracking import _experiment_id, client

    mc = client(settings)
    run = mc.create_run(_experiment_id(mc, settings, "batch-scoring"), run_name=result["key"],
                        tags={"model_version": str(result["model_version"]), "folder": str(folder)})
    keys = ("images", "anomaly", "normal", "failed", "anomaly_rate", "mean_score", "process_seconds", "ms_per_prediction")
    mc.log_batch(run.info.run_id, metrics=[Metric(k, float(result[k]), 0, 0) for k in keys])
    mc.log_artifacts(run.info.run_id, str(out), artifact_path="batch")
    mc.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


@flow(name="score-folder", log_prints=True)
def score_folder_flow(folder: str, out: str = "runs/score", project: str = ".", params_path: str = "params.yaml",
                      model: str = "champion", dvc_target: str | None = None) -> dict[str, Any]:
    """Score ``folder`` (after ``dvc pull dvc_target`` when given) with ``model``; write ``out``/results.csv."""
    root, _, settings = context(project, params_path, None)
    if dvc_target:
        dvc_pull(root, dvc_target)
    src = Path(folder) if Path(folder).is_absolute() else root / folder
    dst = Path(out) if Path(out).is_absolute() else root / out
    result = score(settings, src, dst, model)
    result["mlflow_run"] = log_run(settings, src, dst, result)
    failed = f", {result['failed']} failed (their errors are in results.csv)" if result["failed"] else ""
    print(f"{result['images']} images, {result['anomaly']} flagged (rate {result['anomaly_rate']:.3f} of those "
          f"scored){failed}, {result['ms_per_prediction']:.1f} ms per prediction with version "
          f"{result['model_version']} -> {dst / 'results.csv'}, {dst / 'summary.html'}")
    return result


if __name__ == "__main__":
    import argparse

    from cellscan.settings import setup_offline

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder")
    ap.add_argument("--out", default="runs/score")
    ap.add_argument("--project", default=".")
    ap.add_argument("--model", default="champion")
    ap.add_argument("--dvc-target", default=None)
    a = ap.parse_args()
    setup_offline()
    try:
        root = Path(a.project).resolve()
        if not a.dvc_target:  # a wrong folder or output is said at once, before a flow run starts
            folder = Path(a.folder) if Path(a.folder).is_absolute() else root / a.folder
            folder_images(folder, must_hold_images=True)
        batchscore.check_out_dir(Path(a.out) if Path(a.out).is_absolute() else root / a.out)
        res = score_folder_flow(a.folder, a.out, a.project, model=a.model, dvc_target=a.dvc_target)
    except Exception as exc:  # as flows.common.main: one line for the errors a user can act on
        said = describe(exc)
        if said is None:
            raise
        line = f"{said[0]}: {said[1]}"
        raise SystemExit(line) from None
    raise SystemExit(1 if res["failed"] else 0)  # as `cellscan client predict`: rows with errors are a failure
