"""Tasks shared by the flows: each calls one cellscan.mlops.steps step."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cellscan.mlops import steps as pipeline
from cellscan.core.config import Params, load_params
from cellscan.settings import Settings, setup_offline

setup_offline()


def context(project: str, params_path: str, overrides: dict[str, Any] | None) -> tuple[Path, Params, Settings]:
    root = Path(project).resolve()
    p = Path(params_path)
    params = load_params(p if p.is_absolute() else root / p, overrides)
    return root, params, Settings.from_env(root)


def data_root(project: Path, params: Params) -> Path:
    d = Path(params.data.root)
    return d if d.is_absolute() else project / d


@task(name="version-data", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def version_data(project: Path) -> pipeline.DataVersion:
    return pipeline.version_data(project)


@task(name="register-model", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def register(settings: Settings, result: Any, params: Params, data: pipeline.DataVersion, project: Path,
             run_name: str | None, kind: str) -> Any:
    return pipeline.register(settings, result, params, data, project, run_name, kind)


@task(name="champion-gate", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def gate(settings: Settings, registered: Any, params: Params, root: Path) -> dict[str, Any]:
    return pipeline.gate(settings, registered, params, root)


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(params: Params, root: Path, init_from: Any = None) -> Any:
    from cellscan.core.train import train

    return train(params, root, init_from=init_from)


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write a flow's returned dict as JSON, atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(flow_fn: Callable[..., dict[str, Any]], description: str, argv: list[str] | None = None) -> int:
    """Command-line entry point shared by the flows: ``--project DIR [--params FILE] [--result FILE]``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--project", default=".", help="project folder (params.yaml, data/, mlflow/)")
    ap.add_argument("--params", default="params.yaml", help="params file, relative to the project")
    ap.add_argument("--result", default=None, help="write the flow's result as JSON to this file")
    args = ap.parse_args(argv)
    result = flow_fn(project=args.project, params_path=args.params)
    if args.result:
        write_result(args.result, result)
    return 0
