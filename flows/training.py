"""Prefect flow: version the data, train, evaluate and calibrate, register, champion gate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from cellscan.mlops import steps as pipeline
from flows.common import context, data_root, main, train_and_register, version_data


@flow(name="train-autoencoder", log_prints=True)
def train_flow(
    project: str = ".",
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a new version on the current data and promote it if it passes the gate."""
    root, params, settings = context(project, params_path, overrides)
    with pipeline.training_lock(root):
        data = version_data(root, data_root(root, params))
        _, reg, decision, run = train_and_register(settings, root, params, data, "train")
    summary = {"version": reg.version, "run_id": reg.run_id, "run_name": run.name, "data_hash": data.hash,
               "new_validation_error": reg.metrics.get("validation_error"),
               "new_anomaly_error": reg.metrics.get("anomaly_error"),
               "promoted": decision["promoted"], "reason": decision["reason"], "champion": decision["champion"]}
    print(f"version {reg.version}: {'champion' if decision['promoted'] else 'challenger'} ({decision['reason']})")
    return summary


if __name__ == "__main__":
    raise SystemExit(main(train_flow, "Train a new version and gate it."))
