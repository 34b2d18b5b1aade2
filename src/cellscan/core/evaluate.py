"""Detection metrics: image AUROC/AUPR, precision/recall/F1 at the threshold, pixel AUROC, and both by defect
type and by defect size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cellscan.core.data import Dataset
from cellscan.errors import DatasetError
from cellscan.core.images import load_batch, load_mask
from cellscan.core.scoring import calibrate_threshold

if TYPE_CHECKING:
    from cellscan.core.bundle import CellscanModel


def require_validation(dataset: Dataset) -> None:
    """Raise DatasetError when ``dataset`` has no validation normals (the threshold and metrics need them)."""
    if not dataset.validation:
        msg = (f"{dataset.root}: no validation normals to evaluate on "
               "(expected images in test/good or validation/)")
        raise DatasetError(msg)


def image_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Image-level metrics; AUROC and AUPR are NaN when only one class is present, and precision, recall
    and F1 when there is no anomaly (without one they measure nothing: a gate comparing F1 0 with F1 0
    would promote any model).

    Example:
        >>> m = image_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), 0.3)
        >>> m["image_auroc"], m["recall"], m["precision"]   # one normal above the threshold
        (0.75, 1.0, 0.6666666666666666)
    """
    labels = labels.astype(int)
    pred = scores > threshold
    tp = int(np.sum(pred & (labels == 1)))
    fp = int(np.sum(pred & (labels == 0)))
    fn = int(np.sum(~pred & (labels == 1)))
    both = len(np.unique(labels)) == 2
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if not (labels == 1).any():
        precision = recall = f1 = nan
    return {
        "image_auroc": float(roc_auc_score(labels, scores)) if both else nan,
        "image_aupr": float(average_precision_score(labels, scores)) if both else nan,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": float(np.mean(pred == (labels == 1))),
        "threshold": float(threshold),
    }


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, max_pixels: int = 2_000_000, seed: int = 0) -> float:
    """Pixel AUROC over all images (normal images contribute all-negative masks); NaN without positives."""
    y = masks.reshape(-1).astype(bool)
    s = maps.reshape(-1)
    if not y.any() or y.all():
        return float("nan")
    if len(y) > max_pixels:  # subsample uniformly to bound memory and time
        idx = np.random.default_rng(seed).choice(len(y), max_pixels, replace=False)
        y, s = y[idx], s[idx]
    return float(roc_auc_score(y, s))


# bands of a defect's marked area, in pixels of the mask at the model's working size (4 x 4 px, 6 x 6, 10 x 10,
# 17 x 17, 32 x 32 squares at the bounds): the band's lower bound, inclusive
AREA_BANDS = (1, 16, 40, 100, 300, 1000)


def _band_label(i: int) -> str:
    """Label of band ``i`` as :func:`numpy.searchsorted` (side right) numbers them: 0 below the first bound.

    Example:
        >>> [_band_label(int(np.searchsorted(AREA_BANDS, a, side="right"))) for a in (0, 12, 16, 299, 5000)]
        ['0', '1-16', '16-40', '100-300', '1000+']
    """
    if i == 0:
        return "0"
    return f"{AREA_BANDS[i - 1]}+" if i == len(AREA_BANDS) else f"{AREA_BANDS[i - 1]}-{AREA_BANDS[i]}"


def roc_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """ROC curve points for plots."""
    fpr, tpr, thr = roc_curve(labels.astype(int), scores)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": np.nan_to_num(thr, posinf=1e9).tolist()}


@dataclass
class Evaluation:
    """Scores of a model on a dataset's validation normals and known anomalies."""

    threshold: float
    metrics: dict[str, float]
    labels: np.ndarray
    scores: np.ndarray
    defects: list[str]
    paths: list[Path]
    maps: np.ndarray
    masks: np.ndarray | None = None

    def per_defect(self) -> dict[str, float]:
        """Image AUROC of each defect type against the validation normals."""
        out = {}
        normal = self.labels == 0
        for d in sorted(set(self.defects) - {"good"}):
            sel = normal | np.array([x == d for x in self.defects])
            out[d] = float(roc_auc_score(self.labels[sel], self.scores[sel]))
        return out

    def by_area(self) -> dict[str, dict[str, float]]:
        """How detection depends on a defect's size: the known anomalies grouped by their marked area
        (pixels of the mask at the working size, :data:`AREA_BANDS`), each band's count, its image AUROC
        against all validation normals and its recall at the threshold. ``{}`` without masks or normals;
        anomalies with an empty mask (band ``"0"``) are counted too. What an inspection line asks of a
        model is the smallest defect it finds: an AUROC over all defects hides that when large ones
        dominate.

        Example:
            >>> masks = np.zeros((4, 8, 8), bool); masks[2, :2, :2] = True; masks[3, :6, :6] = True
            >>> ev = Evaluation(1.0, {}, np.array([0, 0, 1, 1]), np.array([0.2, 0.9, 0.5, 3.0]),
            ...                 ["good", "good", "void", "void"], [], np.zeros((4, 8, 8)), masks)
            >>> ev.by_area()   # the 4-pixel void scores below one normal; the 36-pixel one above both
            {'1-16': {'n': 1, 'image_auroc': 0.5, 'recall': 0.0}, '16-40': {'n': 1, 'image_auroc': 1.0, 'recall': 1.0}}
        """
        normal = self.labels == 0
        if self.masks is None or not normal.any():
            return {}
        band = np.searchsorted(AREA_BANDS, self.masks.reshape(len(self.masks), -1).sum(axis=1), side="right")
        out = {}
        for i in np.unique(band[self.labels == 1]):
            sel = (self.labels == 1) & (band == i)
            both = normal | sel
            out[_band_label(int(i))] = {"n": int(sel.sum()),
                                        "image_auroc": float(roc_auc_score(self.labels[both], self.scores[both])),
                                        "recall": float(np.mean(self.scores[sel] > self.threshold))}
        return out


def evaluate_model(
    model: CellscanModel, dataset: Dataset, *, calibrate: bool = True, max_pixels: int = 50_000_000
) -> Evaluation:
    """Score validation normals and known anomalies; calibrate the threshold when asked.

    The validation error and the anomaly error of the original design are the mean scores of
    the validation normals and of the known anomalies.

    Raises:
        DatasetError: the dataset has no validation normals.
    """
    require_validation(dataset)
    samples = dataset.evaluation
    size, chans = model.shape, model.channels
    x = load_batch([s.path for s in samples], size=size, channels=chans, max_pixels=max_pixels)
    res = model.score_arrays(x)
    labels = np.array([s.label for s in samples])
    normal, anomalous = res.scores[labels == 0], res.scores[labels == 1]
    p = model.score_params
    threshold = calibrate_threshold(normal, anomalous, p.threshold_quantile) if calibrate else model.threshold
    metrics = image_metrics(labels, res.scores, threshold)
    metrics["validation_error"] = float(normal.mean())
    metrics["anomaly_error"] = float(anomalous.mean()) if len(anomalous) else float("nan")
    metrics["n_normal"], metrics["n_anomaly"] = float(len(normal)), float(len(anomalous))
    masks = None
    if dataset.has_masks:
        masks = np.stack([load_mask(s.mask, size) for s in samples])
        marked = np.array([s.label == 0 or s.mask is not None for s in samples])  # an unmarked defect is no
        metrics["pixel_auroc"] = pixel_auroc(res.maps[marked], masks[marked])  # evidence of normal pixels
    return Evaluation(threshold, metrics, labels, res.scores, [s.defect for s in samples],
                      [s.path for s in samples], res.maps, masks)
