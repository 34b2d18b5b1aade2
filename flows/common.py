"""Tasks shared by the flows: each calls one cellscan.mlops.steps step."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cellscan.core.config import Params, load_params
from cellscan.core.data import load_dataset
from cellscan.errors import describe
from cellscan.files import write_atomic
from cellscan.mlops import steps as pipeline
from cellscan.mlops import watchdog
from cellscan.settings import Settings, setup_offline


def context(project: str, params_path: str, overrides: dict[str, Any] | None) -> tuple[Path, Params, Settings]:
    root = Path(project).resolve()
    p = Path(params_path)
    params = load_params(p if p.is_absolute() else root / p, overrides)
    return root, params, Settings.from_env(root)


def data_root(project: Path, params: Params) -> Path:
    return pipeline.data_root_of(project, params)


@task(name="version-data", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def version_data(project: Path, droot: Path) -> pipeline.DataVersion:
    return pipeline.version_data(project, droot)


@task(name="open-mlflow-run", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def open_run(settings: Settings, kind: str, params: Params, data: pipeline.DataVersion, project: Path,
             droot: Path, init_from: Any = None) -> Any:
    run = pipeline.open_run(settings, kind, params, data, project, droot, init_from=init_from)
    print(f"MLflow run {run.name} ({run.run_id}) on data {data.hash or 'unversioned'}")
    return run


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(settings: Settings, run: Any, params: Params, data: Any, bundle_dir: Path,
                init_from: Any = None) -> Any:
    return pipeline.train_bundle(params, data, bundle_dir, init_from, settings, run)


@task(name="register-model", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def register(settings: Settings, run: Any, result: Any, bundle_dir: Path) -> pipeline.Registered:
    reg = pipeline.register(settings, run, result.model, result.evaluation, bundle_dir,
                            None, result.seconds)  # epoch metrics were logged live
    print(f"registered {settings.model_name} version {reg.version} from run {reg.run_name} ({reg.run_id})")
    return reg


@task(name="champion-gate", retries=2, retry_delay_seconds=[3, 9], cache_policy=NO_CACHE)
def gate(settings: Settings, registered: pipeline.Registered, params: Params, data: Any) -> dict[str, Any]:
    """Evaluate the champion on the same data, decide (mlops.gate.decide) and move the aliases."""
    out = pipeline.gate(settings, registered, params, data)
    verdict = "promoted to champion" if out["promoted"] else "stays challenger"
    print(f"version {registered.version} {verdict} (compared with {out['champion']}): {out['reason']}")
    return out


def train_and_register(settings: Settings, root: Path, params: Params, data: pipeline.DataVersion, kind: str,
                       init_from: Any = None, progress: dict[str, Any] | None = None,
                       ) -> tuple[Any, pipeline.Registered, dict[str, Any], Any]:
    """The body both training flows share: one MLflow run spans train -> register -> gate. ``progress``
    gets ``registered`` as soon as a version exists: a caller that undoes its work after a failure keeps
    it once a version was made from it."""
    droot = data_root(root, params)
    run = open_run(settings, kind, params, data, root, droot, init_from)
    ok = False
    try:
        images = load_dataset(droot)  # read once: the gate scores the champion on the images trained on
        with tempfile.TemporaryDirectory(prefix="cellscan-bundle-") as tmp:
            bundle = Path(tmp) / "bundle"
            result = train_model(settings, run, params, images, bundle, init_from)
            reg = register(settings, run, result, bundle)
            if progress is not None:
                progress["registered"] = reg.version
        decision = gate(settings, reg, params, images)
        ok = True
    finally:
        pipeline.close_run(settings, run, ok)
    return result, reg, decision, run


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write a flow's returned dict as JSON, atomically (a temp file in the same folder, then rename)."""
    write_atomic(path, json.dumps(result, indent=2, default=str))


def main(flow_fn: Callable[..., dict[str, Any]], description: str, argv: list[str] | None = None) -> int:
    """Command-line entry point shared by the flows: ``--project DIR [--params FILE] [--result FILE]``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--project", default=".", help="project folder (params.yaml, data/, mlflow/)")
    ap.add_argument("--params", default="params.yaml", help="params file, relative to the project")
    ap.add_argument("--result", default=None, help="write the flow's result as JSON to this file")
    args = ap.parse_args(argv)
    setup_offline()  # telemetry off before the first flow run starts Prefect's local API or imports MLflow
    try:
        context(args.project, args.params, None)  # a wrong --project or params file: said at once, no flow run
        dog = watchdog.start()  # killed, this process leaves its flow run crashed and no process behind
        try:
            hooks = [*getattr(flow_fn, "on_running_hooks", []), watchdog.prefect_hook(dog)]
            run = flow_fn.with_options(on_running=hooks) if hasattr(flow_fn, "with_options") else flow_fn
            result = run(project=args.project, params_path=args.params)
        finally:
            dog.close()
        if args.result:
            write_result(args.result, result)
    except Exception as exc:  # the flow run is marked failed with its log; the shell gets one line
        said = describe(exc)  # cellscan's, MLflow's (a server that does not answer) and the system's errors
        if said is None:
            raise
        print(f"{said[0]}: {said[1]}", file=sys.stderr)
        return 1
    return 0
