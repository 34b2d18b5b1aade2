"""The MLOps steps the Prefect flows wire together: version data, open a run, train, register, gate.

Each function does one step and returns plain data, so a flow task is a one-line call and the
steps can be tested without Prefect.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellscan.core.bundle import CellscanModel
from cellscan.core.config import Params
from cellscan.core.data import Dataset, folder_for, load_dataset
from cellscan.core.evaluate import Evaluation, evaluate_model
from cellscan.core.train import TrainResult, train
from cellscan.mlops import registry, tracking, versioning
from cellscan.mlops.gate import decide
from cellscan.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class DataVersion:
    hash: str | None
    dvc_file: str | None


def version_data(project: Path, data_root: Path | None = None, target: str = "data",
                 push: bool = True) -> DataVersion:
    """Snapshot ``project/target`` with DVC when the project is a DVC repository and ``data_root`` (the
    images a run trains on) lies in it; else the run records no data version rather than one of others."""
    if not (project / ".dvc").is_dir():
        logger.warning("%s is not a DVC repository: data stays unversioned", project)
        return DataVersion(None, None)
    versioned = (project / target).resolve()
    if data_root is not None and not data_root.resolve().is_relative_to(versioned):
        logger.warning("data.root %s lies outside %s, the folder DVC versions (%s.dvc): this run's data "
                       "stays unversioned; move the images under %s to version them", data_root, versioned,
                       target, versioned)
        return DataVersion(None, None)
    h = versioning.snapshot(project, target, push=push)
    return DataVersion(h, (project / f"{target}.dvc").read_text())


@dataclass
class Registered:
    """A logged and registered version: its number, run, and the metrics the gate compares."""

    version: int
    run_id: str
    run_name: str
    metrics: dict[str, float]


FINETUNED_TAG = "cellscan.finetuned_from"  # the registered version a training started from


def open_run(settings: Settings, kind: str, params: Params | None, data: DataVersion, project: Path,
             data_root: Path | None = None, name: str | None = None, init_from: Any = None,
             ) -> tracking.RunInfo:
    """Start the MLflow run that will record this training (call before training); ``init_from``: the model
    it fine-tunes (from :func:`finetune_source`), whose version the run records."""
    parent = getattr(init_from, "meta", {}).get("registry_version") if init_from is not None else None
    return tracking.open_run(
        settings, kind, params=params.to_dict() if params else None, data_hash=data.hash,
        dvc_file=data.dvc_file, data_root=data_root, git_commit=versioning.git_commit(project), name=name,
        extra_tags={FINETUNED_TAG: str(parent)} if parent is not None else None,
    )


def close_run(settings: Settings, run: tracking.RunInfo, ok: bool = True) -> None:
    tracking.close_run(settings, run, ok)


def train_bundle(params: Params, data: Path | Dataset, bundle_dir: Path, init_from: Any = None,
                 settings: Settings | None = None, run: tracking.RunInfo | None = None) -> TrainResult:
    """Train and write the bundle directory: the same function ``dvc repro`` (``cellscan train``) runs.

    ``data``: the data folder, or the dataset as read once for the whole run (the gate then scores the
    champion on the same images). With ``settings`` and ``run``, each epoch's losses go into the run as
    the epoch ends.
    """
    callbacks = [tracking.epoch_logger(settings, run)] if settings is not None and run is not None else []
    return train(params, data, bundle_dir, callbacks=callbacks, init_from=init_from)


def register(settings: Settings, run: tracking.RunInfo, model: CellscanModel, evaluation: Evaluation,
             bundle_dir: Path, history: dict[str, list[float]] | None = None,
             seconds: float | None = None) -> Registered:
    """Log the evaluation into the run and register the bundle directory as a new version."""
    metrics = tracking.log_training(settings, run, model, evaluation, history, seconds)
    normals = [p for p, label in zip(evaluation.paths, evaluation.labels, strict=True) if label == 0]
    try:  # the drift monitor's reference: this version's validation normals, as the prediction log sees them
        from cellscan.mlops.monitor.reference import log_reference

        log_reference(settings, run.run_id, model, normals)
    except Exception as exc:  # noqa: BLE001 (a missing reference must not fail a registration)
        logger.warning("monitoring reference not logged: %s", exc)
    version = tracking.log_and_register(settings, run, bundle_dir)
    return Registered(version, run.run_id, run.name, metrics)


def champion_metrics(settings: Settings, data: Path | Dataset, max_pixels: int, calibrate: bool = False,
                     ) -> tuple[int | None, dict[str, float] | None]:
    """The champion's version and its metrics on ``data`` at the threshold it serves with, as the
    challenger's are at its own (``calibrate=True``: a threshold tuned on ``data`` instead, which would
    let a champion whose threshold no longer flags anything keep the alias on its network's merit).

    Pass the dataset the challenger was evaluated on: images stored since (an ``/anomaly`` upload during
    the training) would otherwise count for the champion only.
    """
    version = registry.champion_version(settings)
    if version is None:
        return None, None
    model, _ = registry.load_model(version, settings)
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    ev = evaluate_model(model, dataset, calibrate=calibrate, max_pixels=max_pixels)
    return version, {k: float(v) for k, v in ev.metrics.items()}


def gate(settings: Settings, reg: Registered, params: Params, data: Path | Dataset,
         champion: tuple[int | None, dict[str, float] | None] | None = None) -> dict[str, Any]:
    """Compare the new version with the champion on the same data, then apply the decision.

    ``data``: the dataset the new version was evaluated on (or its folder, read again). ``champion`` is
    (version, metrics) when the caller has evaluated the champion already. A decision already written
    for this version (a retry after a failure past the alias move) is returned as it stands, not taken
    again against the version itself.
    """
    done = registry.written_decision(settings, reg.version)
    if done is not None:  # what the failed attempt had left to do: the run's tag
        verdict = ("promoted: " if done["promoted"] else "rejected: ") + done["reason"]
        tracking.client(settings).set_tag(reg.run_id, "cellscan.gate", verdict)
        return done | {"challenger": reg.version, "challenger_metrics": reg.metrics}
    champ_v, champ_m = champion if champion is not None else champion_metrics(
        settings, data, params.data.max_pixels)
    decision = registry.apply_decision(settings, reg.version, decide(reg.metrics, champ_m, params.gate),
                                       champ_v, champ_m, reg.run_name)
    tracking.client(settings).set_tag(reg.run_id, "cellscan.gate",
                                      ("promoted: " if decision.promoted else "rejected: ") + decision.reason)
    return {"promoted": decision.promoted, "reason": decision.reason, "challenger": reg.version,
            "champion": champ_v, "challenger_metrics": reg.metrics, "champion_metrics": champ_m or {}}


def register_bundle(settings: Settings, params: Params, project: Path, bundle_dir: Path) -> dict[str, Any]:
    """Register a bundle directory written elsewhere (``dvc repro`` -> models/latest) through the same gate.

    The bundle is evaluated with its own threshold on the current data (versioned with DVC first), and
    so is the champion (:func:`champion_metrics`): each as it would serve.
    """
    from cellscan.core.config import params_from_dict

    model = CellscanModel.load_dir(bundle_dir)
    logged = params  # the gate and the evaluation data come from the project's params.yaml ...
    trained_with = model.meta.get("params")
    if isinstance(trained_with, dict):  # ... the run logs the params the bundle was trained with
        try:
            logged = params_from_dict(trained_with)
        except Exception as exc:  # noqa: BLE001 (an older bundle: fall back to params.yaml)
            logger.warning("bundle params unreadable (%s): logging params.yaml instead", exc)
    droot = data_root_of(project, params)
    data = version_data(project, droot)
    run = open_run(settings, "register", logged, data, project, droot)
    ok = False
    try:
        dataset = load_dataset(droot)
        ev = evaluate_model(model, dataset, calibrate=False, max_pixels=params.data.max_pixels)
        reg = register(settings, run, model, ev, bundle_dir)
        out = gate(settings, reg, params, dataset)
        ok = True
    finally:
        close_run(settings, run, ok)
    return {"version": reg.version, "run_id": run.run_id, "run_name": run.name, "data_hash": data.hash} | out


def data_root_of(project: Path, params: Params) -> Path:
    d = Path(params.data.root)
    return d if d.is_absolute() else project / d


def intake_temp(data_root: Path) -> list[Path]:
    """Move images waiting in ``temp/`` into the training role; returns their new paths."""
    ds = load_dataset(data_root)
    dest = data_root / folder_for(ds.layout, "train")
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    try:
        for i, src in enumerate(ds.temp):
            target = dest / f"new_{stamp}_{i:04d}_{src.name}"
            shutil.move(src, target)
            moved.append(target)
    except BaseException:  # all or none: what moved goes back
        return_to_temp(data_root, moved)
        raise
    logger.info("moved %d images from temp/ into %s", len(moved), dest)
    return moved


def return_to_temp(data_root: Path, moved: list[Path]) -> list[Path]:
    """Undo :func:`intake_temp` after a run that failed: each moved image goes back to ``temp/`` under
    the name it came with (a new unique name where that is taken meanwhile); returns where they are."""
    ds = load_dataset(data_root)
    temp = data_root / folder_for(ds.layout, "temp")
    temp.mkdir(parents=True, exist_ok=True)
    back = []
    for path in moved:
        if not path.is_file():
            continue
        parts = path.name.split("_", 3)  # new, stamp, index, the original name
        target = temp / (parts[3] if len(parts) == 4 and parts[0] == "new" else path.name)
        if target.exists():
            target = temp / path.name
        shutil.move(path, target)
        back.append(target)
    logger.info("returned %d images to %s", len(back), temp)
    return back


def add_images(data_root: Path, role: str, files: list[tuple[str, bytes]], defect: str = "anomaly") -> list[Path]:
    """Store encoded images under a role's folder (``temp`` for new normals, ``anomaly`` for defects).

    Each image is stored re-encoded from its decoded pixels as PNG (16-bit stays 16-bit), never as
    the bytes sent, so nothing hidden in the container (a trailing archive) reaches the dataset; it
    gets a unique name; each file is written to a temporary name first and renamed, so a crash or a
    full disk never leaves half a file and two requests never overwrite each other.

    Raises:
        ImageError: an input is not a usable image.
        DatasetError: the file cannot be written (disk full, permissions); nothing is left behind.
    """
    import uuid

    from cellscan.core.images import canonical_png
    from cellscan.errors import DatasetError

    ds = load_dataset(data_root)
    folder = data_root / folder_for(ds.layout, role, defect)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = []
    for name, data in files:
        png, _ = canonical_png(data, name=name)
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40] or "image"
        target = folder / f"{stamp}_{uuid.uuid4().hex[:8]}_{stem}.png"
        tmp = folder / f".{target.name}.part"
        try:
            tmp.write_bytes(png)
            tmp.rename(target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            msg = f"cannot store {target.name} in {folder}: {exc.strerror or exc}"
            raise DatasetError(msg) from None
        out.append(target)
    return out


def reevaluate(settings: Settings, params: Params, data_root: Path, data: DataVersion, project: Path) -> dict[str, Any]:
    """Re-score the champion on the current data and register a new version with the new threshold.

    The original ``/anomaly`` semantics: the validation error, the anomaly error and the threshold
    are recomputed; the old version keeps its threshold. The champion is evaluated once: that
    evaluation is both the new version's and the champion's side of the gate.
    """
    from cellscan.core.config import params_from_dict

    model, version = registry.load_model(registry.CHAMPION, settings)
    logged = params  # the data and the gate follow params.yaml; the run logs the params the network had
    try:
        logged = params_from_dict(model.meta["params"])
    except Exception as exc:  # noqa: BLE001 (an older bundle: params.yaml)
        logger.warning("the champion's params are unreadable (%s): logging params.yaml instead", exc)
    run = open_run(settings, "threshold", logged, data, project, data_root)
    ok, registered = False, None
    try:
        try:
            ev = evaluate_model(model, load_dataset(data_root), calibrate=True,
                                max_pixels=params.data.max_pixels)
            new = model.with_threshold(ev.threshold, metrics=ev.metrics, parent_version=version)
            with tempfile.TemporaryDirectory(prefix="cellscan-bundle-") as tmp:
                bundle = new.save(Path(tmp) / "bundle")
                reg = register(settings, run, new, ev, bundle)
                registered = reg.version
            decision = gate(settings, reg, params, data_root,
                            champion=(version, {k: float(v) for k, v in ev.metrics.items()}))
            ok = True
        finally:
            close_run(settings, run, ok)
    except Exception as exc:  # after a registration (the gate or closing the run failed): a retry from the
        if registered is not None:  # start would register another version, so the caller is told
            exc.cellscan_registered = registered  # type: ignore[attr-defined]
            exc.add_note(f"version {registered} was registered; the gate did not decide on it, or its run "
                         "was not closed")
        raise
    return {
        "new_validation_error": ev.metrics["validation_error"],
        "new_anomaly_error": ev.metrics["anomaly_error"],
        "threshold": ev.threshold,
        "previous_threshold": model.threshold,
        "version": reg.version,
        "run_id": run.run_id,
        "run_name": run.name,
        "promoted": decision["promoted"],
        "reason": decision["reason"],
    }


def finetune_source(settings: Settings, params: Params) -> Any:
    """The champion to fine-tune from, or None for a fresh start (no champion or mode fresh)."""
    if params.retrain.mode != "finetune" or registry.champion_version(settings) is None:
        return None
    model, _ = registry.load_model(registry.CHAMPION, settings)  # its meta names registry_version
    want = params.data.image_size  # 0: the working size comes from the data (fine-tuning keeps the champion's)
    if model.channels != params.data.channels or (want and model.image_size != want):
        logger.warning("champion input shape differs from params: training afresh")
        return None
    from cellscan.core.model import build_network

    mine = [w.shape for w in model.keras_model.get_weights()]
    if mine != [w.shape for w in build_network(params.data.channels, params.model).get_weights()]:
        logger.warning("the champion's network differs from params.model (filters, depth): training afresh")
        return None
    return model


class training_lock:  # noqa: N801 (used as a context manager)
    """An exclusive lock on the project's data: one training / re-evaluation at a time."""

    def __init__(self, project: Path) -> None:
        self.path = project / ".cellscan.lock"
        self._fh: Any = None

    def __enter__(self) -> training_lock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a+")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def _moved_root(params: Params, project: Path, work: Path) -> Path:
    """Where ``params.data.root`` (relative to the project, or inside it) lies in the restored copy."""
    root = Path(params.data.root)
    if root.is_absolute():
        try:
            root = root.resolve().relative_to(project.resolve())
        except ValueError:
            return work / "data"
    return work / root


def reproduce(settings: Settings, ref: int | str, project: Path, workdir: Path | None = None) -> dict[str, Any]:
    """Retrain a version from what its run logged: its data version (from the DVC cache or remote, in a
    separate folder; the project's data stays as it is) and its params; compare the metrics.

    Raises:
        RegistryError: the version's run has no data.dvc or params.json (unversioned or not a training run).
    """
    from cellscan.core.config import params_from_dict
    from cellscan.errors import RegistryError

    info = registry.lineage(settings, ref)
    run_id = info["run_id"]
    if info["kind"] == "threshold":  # no training to repeat: the network is its parent's
        parent = info["compared_with"]  # a re-evaluation is gated against the champion whose network it has
        msg = (f"version {info['version']} is version {parent}'s network with the threshold re-evaluated on "
               f"newer data; nothing was trained: reproduce version {parent}")
        raise RegistryError(msg)
    dvc_text = tracking.load_dvc_file(settings, run_id)
    if dvc_text is None:
        msg = f"version {info['version']}: its run {info['run_name']} logged no data.dvc (data was unversioned)"
        raise RegistryError(msg)
    params = params_from_dict(tracking.load_params_dict(settings, run_id))
    parent = info.get("finetuned_from")  # a fine-tuning starts from that version's weights again
    init = registry.load_model(int(parent), settings)[0] if parent else None
    with tempfile.TemporaryDirectory(prefix="cellscan-reproduce-") as tmp:
        work = workdir or Path(tmp)
        restored = versioning.restore_into(project, dvc_text, work)
        result = train(params, _moved_root(params, project, work), init_from=init)
    new = tracking.finite(result.evaluation.metrics)
    old = {k: float(v) for k, v in info["metrics"].items() if k in new}
    return {
        "version": info["version"], "run_name": info["run_name"], "data_hash": info["data_hash"],
        "finetuned_from": int(parent) if parent else None,
        "restored_hash": restored, "same_data": restored == info["data_hash"],
        "logged": old, "reproduced": new, "diff": {k: new[k] - old[k] for k in old},
    }
