"""The MLOps steps the Prefect flows wire together: version data, train, register, gate, retrain.

Each function does one step and returns plain data, so a flow task is a one-line call and the
steps can be tested without Prefect.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cellscan.mlops import registry
from cellscan.mlops import versioning
from cellscan.core.config import Params
from cellscan.settings import Settings
from cellscan.core.data import folder_for, list_images, load_dataset
from cellscan.core.evaluate import evaluate_model
from cellscan.core.train import TrainResult, train

logger = logging.getLogger(__name__)


@dataclass
class DataVersion:
    hash: str | None
    dvc_file: str | None


def version_data(project: Path, target: str = "data", push: bool = True) -> DataVersion:
    """Snapshot ``project/target`` with DVC when the project is a DVC repository."""
    if not (project / ".dvc").is_dir():
        logger.warning("%s is not a DVC repository: data stays unversioned", project)
        return DataVersion(None, None)
    h = versioning.snapshot(project, target, push=push)
    return DataVersion(h, (project / f"{target}.dvc").read_text())


def champion_metrics(settings: Settings, data_root: Path, max_pixels: int) -> dict[str, float] | None:
    """The champion's metrics on ``data_root`` (threshold calibrated there, like the challenger's)."""
    if registry.champion_version(settings) is None:
        return None
    model, _ = registry.load_model(settings)
    ev = evaluate_model(model, load_dataset(data_root), calibrate=True, max_pixels=max_pixels)
    return {k: float(v) for k, v in ev.metrics.items()}


def register(
    settings: Settings, result: TrainResult, params: Params, data: DataVersion, project: Path,
    run_name: str | None, kind: str,
) -> registry.Registered:
    return registry.log_and_register(
        settings, result.model, result.evaluation, history=result.history, params_flat=params.flat(),
        data_hash=data.hash, dvc_file=data.dvc_file, git_commit=versioning.git_commit(project),
        run_name=run_name, kind=kind,
    )


def gate(settings: Settings, reg: registry.Registered, params: Params, data_root: Path) -> dict[str, Any]:
    champ = champion_metrics(settings, data_root, params.data.max_pixels)
    return asdict(registry.gate(settings, reg, champ, params.gate))


def intake_temp(data_root: Path) -> list[Path]:
    """Move images waiting in ``temp/`` into the training role; returns their new paths."""
    ds = load_dataset(data_root)
    dest = data_root / folder_for(ds.layout, "train")
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for i, src in enumerate(ds.temp):
        target = dest / f"new_{stamp}_{i:04d}_{src.name}"
        shutil.move(src, target)
        moved.append(target)
    logger.info("moved %d images from temp/ into %s", len(moved), dest)
    return moved


def add_images(data_root: Path, role: str, files: list[tuple[str, bytes]], defect: str = "anomaly") -> list[Path]:
    """Store encoded images under a role's folder (``temp`` for new normals, ``anomaly`` for defects).

    The bytes are kept as sent (16-bit stays 16-bit), under a unique name with the suffix of the
    decoded format; each file is written to a temporary name first and renamed, so a crash never
    leaves half a file and two requests never overwrite each other.
    """
    import io
    import uuid

    from PIL import Image

    suffixes = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}
    ds = load_dataset(data_root)
    folder = data_root / folder_for(ds.layout, role, defect)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = []
    for name, data in files:
        with Image.open(io.BytesIO(data)) as img:
            suffix = suffixes.get(img.format or "", ".png")
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40] or "image"
        target = folder / f"{stamp}_{uuid.uuid4().hex[:8]}_{stem}{suffix}"
        tmp = folder / f".{target.name}.part"
        tmp.write_bytes(data)
        tmp.rename(target)
        out.append(target)
    return out


def reevaluate(settings: Settings, params: Params, data_root: Path, data: DataVersion, project: Path) -> dict[str, Any]:
    """Re-score the champion on the current data and register a new version with the new threshold.

    The original ``/anomaly`` semantics: the validation error, the anomaly error and the threshold
    are recomputed; the old version keeps its threshold.
    """
    model, version = registry.load_model(settings)
    ev = evaluate_model(model, load_dataset(data_root), calibrate=True, max_pixels=params.data.max_pixels)
    new = model.with_threshold(ev.threshold, metrics=ev.metrics, parent_version=version)
    reg = registry.log_and_register(
        settings, new, ev, params_flat=params.flat(), data_hash=data.hash, dvc_file=data.dvc_file,
        git_commit=versioning.git_commit(project), run_name=f"threshold-from-v{version}", kind="threshold",
    )
    decision = registry.gate(settings, reg, champion_metrics(settings, data_root, params.data.max_pixels),
                             params.gate)
    return {
        "new_validation_error": ev.metrics["validation_error"],
        "new_anomaly_error": ev.metrics["anomaly_error"],
        "threshold": ev.threshold,
        "previous_threshold": model.threshold,
        "version": reg.version,
        "promoted": decision.promoted,
        "reason": decision.reason,
    }


def finetune_source(settings: Settings, params: Params) -> Any:
    """The champion to fine-tune from, or None for a fresh start (no champion or mode fresh)."""
    if params.retrain.mode != "finetune" or registry.champion_version(settings) is None:
        return None
    model, _ = registry.load_model(settings)
    if (model.image_size, model.channels) != (params.data.image_size, params.data.channels):
        logger.warning("champion input shape differs from params: training afresh")
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
