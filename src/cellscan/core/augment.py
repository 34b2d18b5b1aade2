"""Training-time augmentation and simulated anomalies (numpy, seeded).

The autoencoder learns to *restore* normal images: some inputs carry a simulated anomaly pasted
through a random blob mask while the target stays the clean image (the reconstructive half of
DRAEM, ICCV 2021). A model trained so cannot simply copy its input, and its reconstruction error
is large where real anomalies sit.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def augment(x: np.ndarray, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """Random flips / quarter turns (when ``flip``) and small brightness and contrast changes."""
    if flip:
        if rng.random() < 0.5:
            x = x[:, ::-1]
        if rng.random() < 0.5:
            x = x[::-1]
        x = np.rot90(x, int(rng.integers(0, 4)))
    gain, bias = rng.uniform(0.92, 1.08), rng.uniform(-0.04, 0.04)
    mean = x.mean()
    return np.clip((x - mean) * gain + mean + bias, 0.0, 1.0).astype(np.float32)


def blob_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random blob mask from thresholded smooth noise (Perlin-like), covering roughly 1-15 %."""
    h, w = shape
    for _ in range(10):
        sigma = rng.uniform(1.5, max(2.0, min(h, w) / 8))
        noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma)
        # Keep blobs local: weight the noise by a random gaussian envelope.
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        yy, xx = np.mgrid[0:h, 0:w]
        env = np.exp(-(((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.25 * w)) ** 2))
        field = noise / (noise.std() + 1e-8) * env
        mask = field > np.quantile(field, 1 - rng.uniform(0.01, 0.15))
        if mask.any():
            return mask
    return np.zeros(shape, dtype=bool)


def simulate_anomaly(x: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paste a synthetic anomaly into ``x`` (H, W, C); returns (corrupted image, mask).

    Sources, chosen at random: a shifted patch of another normal image, smooth noise texture,
    a flat bright or dark fill, or the image itself with its intensity scaled.
    """
    h, w, c = x.shape
    mask = blob_mask((h, w), rng)
    kind = int(rng.integers(0, 4))
    if kind == 0 and len(pool):
        other = pool[int(rng.integers(0, len(pool)))]
        src = np.roll(other, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
        src = np.rot90(src, int(rng.integers(0, 4))) if h == w else src
    elif kind == 1:
        tex = ndimage.gaussian_filter(rng.random((h, w, c)), (rng.uniform(0.5, 3), rng.uniform(0.5, 3), 0))
        lo, hi = tex.min(), tex.max()
        src = (tex - lo) / (hi - lo + 1e-8)
    elif kind == 2:
        src = np.full_like(x, rng.choice([rng.uniform(0.0, 0.2), rng.uniform(0.8, 1.0)]))
    else:
        src = np.clip(x * rng.uniform(0.3, 1.7), 0, 1)
    beta = rng.uniform(0.0, 0.6)
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 0.7)[..., None]
    out = x * (1 - soft) + (beta * x + (1 - beta) * src) * soft
    return np.clip(out, 0, 1).astype(np.float32), mask
