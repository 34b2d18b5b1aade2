"""Prefect flow: version the data, train, evaluate and calibrate, register, champion gate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from cellscan.mlops import steps as pipeline
from flows.common import context, main, data_root, gate, register, train_model, version_data


@flow(name="train-autoencoder", log_prints=True)
def train_flow(
    project: str = ".",
    params_path: str = "params.yaml",
    run_name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a new version on the current data and promote it if it passes the gate."""
    root, params, settings = context(project, params_path, overrides)
    with pipeline.training_lock(root):
        data = version_data(root)
        result = train_model(params, data_root(root, params))
        reg = register(settings, result, params, data, root, run_name, "train")
        decision = gate(settings, reg, params, data_root(root, params))
    summary = {"version": reg.version, "run_id": reg.run_id, "data_hash": data.hash} | decision
    print(f"version {reg.version}: {'champion' if decision['promoted'] else 'challenger'} ({decision['reason']})")
    return summary


if __name__ == "__main__":
    raise SystemExit(main(train_flow, "Train a new version and gate it."))
