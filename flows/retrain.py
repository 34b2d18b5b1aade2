"""Prefect flow: take new scans from temp/ into the training set, retrain, gate."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from cellscan.mlops import steps as pipeline
from flows.common import context, data_root, main, train_and_register, version_data


@task(name="intake-temp", cache_policy=NO_CACHE)
def intake(root: Any) -> list[Any]:
    return pipeline.intake_temp(root)


@task(name="load-champion", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def champion(settings: Any, params: Any) -> Any:
    return pipeline.finetune_source(settings, params)


@flow(name="retrain", log_prints=True)
def retrain_flow(
    project: str = ".",
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    require_new_images: bool = False,
) -> dict[str, Any]:
    """Move temp/ images into training (a new data version), fine-tune or train afresh, then gate."""
    root, params, settings = context(project, params_path, overrides)
    with pipeline.training_lock(root):
        droot = data_root(root, params)
        taken = intake(droot)
        moved = len(taken)
        if moved == 0 and require_new_images:
            print("no new images in temp/: nothing to retrain")
            return {"moved": 0, "skipped": True, "version": None, "promoted": False,
                    "reason": "no new images in temp/", "new_validation_error": None, "new_anomaly_error": None}
        progress: dict[str, Any] = {}
        try:
            data = version_data(root, droot)
            init = champion(settings, params)
            p = replace(params, train=replace(params.train, epochs=params.retrain.epochs)) if init else params
            result, reg, decision, run = train_and_register(settings, root, p, data, "retrain", init,
                                                            progress)
        except BaseException:  # the new images wait in temp/ for the next retraining, not half-taken
            if taken and "registered" not in progress:  # once a version was made from them, they stay
                back = pipeline.return_to_temp(droot, taken)
                print(f"retrain failed: {len(back)} images went back to temp/")
                try:  # the recorded data version matches the folders again (locally: a push may fail again)
                    pipeline.version_data(root, droot, push=False)
                except Exception as exc:
                    print(f"the data version could not be recorded again ({type(exc).__name__}: {exc})")
            raise
    out = {"moved": moved, "version": reg.version, "run_id": reg.run_id, "run_name": run.name,
           "data_hash": data.hash,
           "new_validation_error": result.evaluation.metrics["validation_error"],
           "new_anomaly_error": result.evaluation.metrics["anomaly_error"],
           "promoted": decision["promoted"], "reason": decision["reason"], "champion": decision["champion"]}
    print(f"retrained on {moved} new images: version {reg.version} promoted={decision['promoted']}")
    return out


if __name__ == "__main__":
    raise SystemExit(main(retrain_flow, "Take temp/ images into training, retrain, gate."))
