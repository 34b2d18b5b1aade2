"""Pictures as PNG bytes: ROC curve and score histograms (matplotlib, headless), heatmap overlays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cellscan.core.evaluate import Evaluation, roc_points


def _png(fig: object) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buf.getvalue()


def roc_png(ev: Evaluation) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if len(np.unique(ev.labels)) == 2:
        pts = roc_points(ev.labels, ev.scores)
        ax.plot(pts["fpr"], pts["tpr"], label=f"AUROC {ev.metrics['image_auroc']:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image ROC")
    ax.legend(loc="lower right")
    return _png(fig)


def histogram_png(ev: Evaluation) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.linspace(float(ev.scores.min()), float(ev.scores.max()) + 1e-9, 30)
    ax.hist(ev.scores[ev.labels == 0], bins=bins, alpha=0.6, label="normal")
    if (ev.labels == 1).any():
        ax.hist(ev.scores[ev.labels == 1], bins=bins, alpha=0.6, label="anomaly")
    ax.axvline(ev.threshold, color="k", ls="--", label="threshold")
    ax.set(xlabel="reconstruction_error (image score)", ylabel="images", title="score distribution")
    ax.legend()
    return _png(fig)


def _jet(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map for values in [0, 1]: (H, W) -> (H, W, 3) in [0, 1]."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float | None = None, alpha: float = 0.45) -> np.ndarray:
    """Blend a colour-mapped anomaly map onto a grayscale/RGB image; returns uint8 RGB at the image's size.

    A map of another size (the model's working size) is resized to the image first.
    """
    from cellscan.core.images import resize

    if amap.shape[:2] != image.shape[:2]:
        amap = resize(amap[..., None].astype(np.float32), image.shape[:2])[..., 0]
    lo = float(np.min(amap))
    hi = max(float(np.max(amap)), (threshold or 0.0) * 2, lo + 1e-6)
    out = np.empty((*image.shape[:2], 3), np.uint8)
    step = max(1, (1 << 20) // max(1, image.shape[1]))  # about a million pixels at a time: bounded memory
    for r in range(0, image.shape[0], step):
        block = image[r:r + step]
        gray = (block[..., 0] if block.shape[-1] == 1 else block.mean(axis=-1))[..., None]
        heat = _jet((amap[r:r + step] - lo) / (hi - lo))
        out[r:r + step] = (np.clip((1 - alpha) * gray + alpha * heat, 0, 1) * 255).astype(np.uint8)
    return out


def overlay_png(image: np.ndarray, amap: np.ndarray, threshold: float | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(overlay(image, amap, threshold)).save(buf, format="PNG")
    return buf.getvalue()


def strip_png(images: np.ndarray, recons: np.ndarray, maps: np.ndarray) -> bytes:
    """Rows of (input, reconstruction, heatmap overlay) for a few images."""
    rows = []
    for x, r, m in zip(images, recons, maps, strict=True):
        to_rgb = lambda a: (np.repeat(a[..., :1], 3, axis=-1) * 255).astype(np.uint8)  # noqa: E731
        rows.append(np.concatenate([to_rgb(x), to_rgb(r), overlay(x, m)], axis=1))
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG")
    return buf.getvalue()
