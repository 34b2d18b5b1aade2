"""Prefect flow: re-evaluate the champion's errors and threshold on the current data (new version)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cellscan.mlops import steps as pipeline
from flows.common import context, main, data_root, version_data


def nothing_registered(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only a failure before a version was registered (a retry from the start would add another)."""
    return getattr(state.result(raise_on_failure=False), "cellscan_registered", None) is None


@task(name="reevaluate-threshold", retries=1, retry_delay_seconds=[5], retry_condition_fn=nothing_registered,
      cache_policy=NO_CACHE)
def reevaluate(settings: Any, params: Any, root: Any, data: Any, project: Any) -> dict[str, Any]:
    return pipeline.reevaluate(settings, params, root, data, project)


@flow(name="evaluate-threshold", log_prints=True)
def evaluate_threshold_flow(project: str = ".", params_path: str = "params.yaml") -> dict[str, Any]:
    """The original /anomaly semantics: new validation and anomaly errors, and a new threshold."""
    root, params, settings = context(project, params_path, None)
    with pipeline.training_lock(root):
        droot = data_root(root, params)
        data = version_data(root, droot)
        out = reevaluate(settings, params, droot, data, root)
    print(f"MLflow run {out['run_name']} ({out['run_id']}): threshold {out['previous_threshold']:.4g} -> "
          f"{out['threshold']:.4g}, registered version {out['version']}, promoted={out['promoted']} ({out['reason']})")
    return out


if __name__ == "__main__":
    raise SystemExit(main(evaluate_threshold_flow, "Re-evaluate the champion's errors and threshold."))
