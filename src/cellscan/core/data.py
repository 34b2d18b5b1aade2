"""Dataset layouts and the one mapping between them.

Two layouts are read:

- **MVTec**: ``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``
- **roles** (the original design): ``training/``, ``validation/``, ``anomaly/`` (images directly, or in
  ``anomaly/<defect>/``), ``temp/``; masks, where any, under ``ground_truth/<defect>/``

Both map onto the same four roles (:data:`ROLE_FOLDERS` is the single place that says how):

============  ================  ====================  ===============================================
role          MVTec             roles layout          used for
============  ================  ====================  ===============================================
train         train/good        training/             normal images the model is fitted on
validation    test/good         validation/           normals giving the normal reconstruction error
anomaly       test/<defect>     anomaly[/<defect>]/   known anomalies giving the anomaly error
temp          temp/             temp/                 new normal scans waiting for retraining
============  ================  ====================  ===============================================

The threshold is calibrated, and the model evaluated, on validation + anomaly. Early stopping uses a
seeded hold-out of ``train`` (``data.val_fraction``), so no evaluation image is seen in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellscan.errors import DatasetError
from cellscan.core.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

LAYOUTS = ("mvtec", "roles")
ROLE_FOLDERS: dict[str, dict[str, str]] = {
    "train": {"mvtec": "train/good", "roles": "training"},
    "validation": {"mvtec": "test/good", "roles": "validation"},
    "anomaly": {"mvtec": "test/{defect}", "roles": "anomaly/{defect}"},
    "temp": {"mvtec": "temp", "roles": "temp"},
}


def folder_for(layout: str, role: str, defect: str = "defect") -> str:
    """The folder, relative to the dataset root, that holds ``role`` in ``layout``."""
    if layout not in LAYOUTS:
        msg = f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}"
        raise DatasetError(msg)
    if role not in ROLE_FOLDERS:
        msg = f"unknown role {role!r}; expected one of {', '.join(ROLE_FOLDERS)}"
        raise DatasetError(msg)
    return ROLE_FOLDERS[role][layout].format(defect=defect)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (empty when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not hidden(p.name))


def hidden(name: str) -> bool:
    """Dot files and folders (macOS ``._a.png``, ``.thumbs``) and NAS index folders (Synology ``@eaDir``):
    never images of the dataset or defect types."""
    return name.startswith((".", "@"))


def folder_images(folder: Path, *, must_hold_images: bool = False) -> list[Path]:
    """The images under ``folder`` (recursively), sorted.

    Raises:
        DatasetError: ``folder`` is missing or a file, or (``must_hold_images``) holds no image.
    """
    if not folder.is_dir():
        msg = f"{folder} is a file; expected a folder of images" if folder.exists() else f"folder does not exist: {folder}"
        raise DatasetError(msg)
    subfolders = [x for x in folder.rglob("*")
                  if x.is_dir() and not any(hidden(n) for n in x.relative_to(folder).parts)]
    paths = sorted({p for d in [folder, *subfolders] for p in list_images(d)})
    if must_hold_images and not paths:
        msg = f"no images under {folder}; expected {', '.join(IMAGE_SUFFIXES)} files"
        raise DatasetError(msg)
    return paths


@dataclass(frozen=True)
class Sample:
    """One labelled evaluation image."""

    path: Path
    label: int  # 0 normal, 1 anomaly
    defect: str = "good"
    mask: Path | None = None


@dataclass
class Dataset:
    """A dataset folder resolved into roles."""

    root: Path
    layout: str
    train: list[Path]
    validation: list[Sample]
    anomalies: list[Sample]
    temp: list[Path] = field(default_factory=list)

    @property
    def evaluation(self) -> list[Sample]:
        """Validation normals followed by known anomalies."""
        return self.validation + self.anomalies

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.anomalies)

    def split_train(self, val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
        """Seeded split of the training normals into (fit, early-stopping hold-out)."""
        order = np.random.default_rng(seed).permutation(len(self.train))
        n_val = max(1, round(len(self.train) * val_fraction))
        if len(self.train) - n_val < 1:
            msg = f"{self.root}: need at least 2 training images, found {len(self.train)}"
            raise DatasetError(msg)
        held = {int(i) for i in order[:n_val]}
        fit = [p for i, p in enumerate(self.train) if i not in held]
        return fit, [self.train[i] for i in sorted(held)]

    def summary(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "anomaly": len(self.anomalies),
            "temp": len(self.temp),
        }


def detect_layout(root: Path) -> str:
    """Return ``"mvtec"`` or ``"roles"`` for a dataset folder.

    Raises:
        DatasetError: the folder is missing or follows neither layout.
    """
    if not root.is_dir():
        msg = f"dataset folder does not exist: {root}"
        raise DatasetError(msg)
    if (root / "train" / "good").is_dir():
        return "mvtec"
    if (root / "training").is_dir():
        return "roles"
    msg = (
        f"{root}: unknown dataset layout; expected train/good (MVTec layout) "
        "or training/ (training, validation, anomaly, temp roles)"
    )
    raise DatasetError(msg)


def _mask_for(root: Path, defect: str, image: Path) -> Path | None:
    mask = root / "ground_truth" / defect / f"{image.stem}_mask.png"
    return mask if mask.is_file() else None


def _anomalies(root: Path, base: Path, flat_name: str) -> list[Sample]:
    out = [Sample(p, 1, flat_name, _mask_for(root, flat_name, p)) for p in list_images(base)]
    if base.is_dir():
        for sub in sorted(d for d in base.iterdir()
                          if d.is_dir() and d.name != "good" and not hidden(d.name)):
            out += [Sample(p, 1, sub.name, _mask_for(root, sub.name, p)) for p in list_images(sub)]
    return out


def load_dataset(root: str | Path) -> Dataset:
    """Resolve a dataset folder (either layout) into its roles.

    Raises:
        DatasetError: the folder is missing, follows no known layout, or has no training images.
    """
    root = Path(root)
    layout = detect_layout(root)
    if layout == "mvtec":
        train = list_images(root / "train" / "good")
        validation = [Sample(p, 0) for p in list_images(root / "test" / "good")]
        anomalies = _anomalies(root, root / "test", "defect")
        temp = list_images(root / "temp")
    else:
        train = list_images(root / "training")
        validation = [Sample(p, 0) for p in list_images(root / "validation")]
        anomalies = _anomalies(root, root / "anomaly", "anomaly")
        temp = list_images(root / "temp")
    if not train:
        msg = f"{root}: no training images in {folder_for(layout, 'train')}/ (expected {', '.join(IMAGE_SUFFIXES)})"
        raise DatasetError(msg)
    ds = Dataset(root, layout, train, validation, anomalies, temp)
    logger.info("dataset %s (%s layout): %s", root, layout, ds.summary())
    return ds
