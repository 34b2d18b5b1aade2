"""Pictures for people: heatmap overlays and reconstruction strips (PNG bytes)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _jet(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map for values in [0, 1]: (H, W) -> (H, W, 3) in [0, 1]."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float | None = None, alpha: float = 0.45) -> np.ndarray:
    """Blend a colour-mapped anomaly map onto a grayscale/RGB image; returns uint8 RGB."""
    gray = image[..., 0] if image.shape[-1] == 1 else image.mean(axis=-1)
    base = np.repeat(gray[..., None], 3, axis=-1)
    lo = float(np.min(amap))
    hi = max(float(np.max(amap)), (threshold or 0.0) * 2, lo + 1e-6)
    heat = _jet((amap - lo) / (hi - lo))
    return (np.clip((1 - alpha) * base + alpha * heat, 0, 1) * 255).astype(np.uint8)


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
