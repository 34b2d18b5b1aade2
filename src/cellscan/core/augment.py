"""Training-time augmentation, random crops and simulated anomalies (numpy, seeded).

Both networks learn from anomalies made up on the fly (DRAEM, ICCV 2021): a region shaped by
thresholded Perlin noise, or a CT-like defect, is filled with foreign content while the
reconstruction target stays the clean image and the head's target is the region's mask. The
sources are procedural or come from the training normals themselves; nothing is downloaded:

- another training image, shifted and turned; the image itself, shifted or rotated
- smooth noise texture; a flat bright or dark fill; the image with its intensity scaled
- CT defects: dark voids and pores (ellipses), bright particles (small dots), thin dark cracks
  (random polylines), a misaligned band (a strip of the image shifted sideways), and faint pores and
  smudges (a soft dip or bump of a few times the image's grain, the grain left as it is)

One family is kept out of training on purpose: :func:`simulate_warp` (a region of the image bent by a
smooth displacement, as a bulged winding or a deformed layer would be). No network ever learns it, so it
measures every part of the score alike (see :meth:`cellscan.core.bundle.CellscanModel.fit_stats`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CT_SHARE = 0.4  # share of simulated anomalies that are CT-like defects (the product's target), the rest DRAEM-style


def augment(x: np.ndarray, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """Random flips / quarter turns (when ``flip``; square images only) and small brightness and contrast changes."""
    if flip:
        if rng.random() < 0.5:
            x = x[:, ::-1]
        if rng.random() < 0.5:
            x = x[::-1]
        if x.shape[0] == x.shape[1]:
            x = np.rot90(x, int(rng.integers(0, 4)))
    gain, bias = rng.uniform(0.92, 1.08), rng.uniform(-0.04, 0.04)
    mean = x.mean()
    return np.clip((x - mean) * gain + mean + bias, 0.0, 1.0).astype(np.float32)


def random_crop(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop of (H, W, C), reflect-padded first when the image is smaller."""
    h, w = x.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
        h, w = x.shape[:2]
    y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return x[y0 : y0 + size, x0 : x0 + size]


def perlin(shape: tuple[int, int], res: int, rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise of ``shape`` with ``res`` lattice cells along the longer side, about in [-1, 1]."""
    h, w = shape
    ry, rx = max(1, round(res * h / max(h, w))), max(1, round(res * w / max(h, w)))
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    yy = np.linspace(0, ry, h, endpoint=False)
    xx = np.linspace(0, rx, w, endpoint=False)
    y0, x0 = yy.astype(int)[:, None], xx.astype(int)[None, :]
    fy, fx = (yy % 1)[:, None], (xx % 1)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grad[y0 + dy, x0 + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731
    uy, ux = fade(fy), fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return (top * (1 - uy) + bottom * uy) * np.sqrt(2)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A DRAEM-style region: thresholded Perlin noise at a random scale, kept to a random window."""
    h, w = shape
    for _ in range(10):
        res = int(2 ** rng.integers(1, 4)) * max(1, max(h, w) // 128)
        field = perlin(shape, res, rng)
        mask = field > rng.uniform(0.35, 0.6)
        # Keep it local: at most a random window of a third to two thirds of each side.
        wh, ww = int(h * rng.uniform(0.33, 0.67)), int(w * rng.uniform(0.33, 0.67))
        y0, x0 = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
        window = np.zeros(shape, dtype=bool)
        window[y0 : y0 + wh, x0 : x0 + ww] = True
        mask &= window
        if mask.sum() >= 4:
            return mask
    return blob_mask(shape, rng)


def blob_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random blob mask from thresholded smooth noise under a gaussian envelope, covering roughly 1-15 %."""
    h, w = shape
    for _ in range(10):
        sigma = rng.uniform(1.5, max(2.0, min(h, w) / 8))
        noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma)
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        yy, xx = np.mgrid[0:h, 0:w]
        env = np.exp(-(((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.25 * w)) ** 2))
        field = noise / (noise.std() + 1e-8) * env
        mask = field > np.quantile(field, 1 - rng.uniform(0.01, 0.15))
        if mask.any():
            return mask
    return np.zeros(shape, dtype=bool)


def _ellipses(shape: tuple[int, int], rng: np.random.Generator, n: int, r_lo: float, r_hi: float) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(r_lo, r_hi), rng.uniform(r_lo, r_hi)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        mask |= (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return mask


def _crack(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    y, x = rng.uniform(0, h), rng.uniform(0, w)
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(max(h, w) // 6, max(h, w) // 2 + 2))):
        angle += rng.normal(0, 0.35)
        y, x = y + np.sin(angle), x + np.cos(angle)
        if not (0 <= y < h and 0 <= x < w):
            break
        mask[int(y), int(x)] = True
    # Cracks one or two pixels wide (note: iterations=0 would dilate until nothing changes).
    return ndimage.binary_dilation(mask) if mask.any() and rng.random() < 0.5 else mask


CT_KINDS = ("void", "particle", "crack", "band", "faint")


def ct_defect(x: np.ndarray, rng: np.random.Generator,
              kind: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like defect in (H, W, C): (source image to blend in, mask); ``kind`` indexes ``CT_KINDS``
    (drawn at random by default)."""
    h, w = x.shape[:2]
    scale = max(1.0, min(h, w) / 64)
    kind = int(rng.integers(0, len(CT_KINDS))) if kind is None else kind
    level = float(np.median(x))
    if kind == 0:  # voids and pores: dark ellipses
        mask = _ellipses((h, w), rng, int(rng.integers(1, 5)), 1.0 * scale, 5.0 * scale)
        src = x * rng.uniform(0.05, 0.5)
    elif kind == 1:  # foreign particles: small bright dots
        mask = _ellipses((h, w), rng, int(rng.integers(1, 4)), 0.7 * scale, 2.5 * scale)
        src = np.full_like(x, min(1.0, max(level, float(x.max())) * rng.uniform(1.0, 1.3)))
    elif kind == 2:  # thin cracks
        mask = _crack((h, w), rng)
        src = x * rng.uniform(0.0, 0.4)
    elif kind == 3:  # misaligned band: a strip shifted sideways
        band = int(rng.integers(max(2, h // 16), max(3, h // 4)))
        y0 = int(rng.integers(0, h - band + 1))
        mask = np.zeros((h, w), dtype=bool)
        mask[y0 : y0 + band] = True
        src = np.roll(x, int(rng.choice([-1, 1]) * rng.integers(2, max(3, w // 8))), axis=1)
    else:  # kind 4, faint pores and smudges: a soft dip or bump under the image's own grain, as a
        # small void or inclusion changes the attenuation a little while the detector's noise stays
        core = _ellipses((h, w), rng, int(rng.integers(1, 3)), 0.7 * scale, rng.choice([3.0, 8.0]) * scale)
        profile = ndimage.gaussian_filter(core.astype(np.float32), max(0.7, 0.5 * scale))
        profile /= max(float(profile.max()), 1e-6)
        gray = x.mean(axis=-1)
        grain = float((gray - ndimage.gaussian_filter(gray, 2.0 * scale)).std())
        amp = rng.uniform(1.5, 4.0) * max(grain, 0.01) * rng.choice([-1.0, 1.0])
        mask = profile > 0.25
        src = x + amp * profile[..., None]
    return src.astype(np.float32), mask


def simulate_anomaly(x: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paste a synthetic anomaly into ``x`` (H, W, C); returns (corrupted image, mask).

    ``pool`` holds other normal images (or crops) of the same size, used as foreign texture.
    """
    h, w, c = x.shape
    if rng.random() < CT_SHARE:
        return simulate_ct_defect(x, rng)
    kind = int(rng.integers(0, 6))
    mask = perlin_mask((h, w), rng) if rng.random() < 0.7 else blob_mask((h, w), rng)
    beta = rng.uniform(0.0, 0.6)
    if kind == 0 and len(pool):
        other = pool[int(rng.integers(0, len(pool)))]
        src = np.roll(other, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
        src = np.rot90(src, int(rng.integers(0, 4))) if h == w else src[::-1]
    elif kind == 1:
        tex = ndimage.gaussian_filter(rng.random((h, w, c)), (rng.uniform(0.5, 3), rng.uniform(0.5, 3), 0))
        lo, hi = tex.min(), tex.max()
        src = lo + (tex - lo) / (hi - lo + 1e-8) * rng.uniform(0.3, 1.0)
    elif kind == 2:
        src = np.full_like(x, rng.choice([rng.uniform(0.0, 0.2), rng.uniform(0.8, 1.0)]))
    elif kind == 3:
        src = np.clip(x * rng.uniform(0.3, 1.7), 0, 1)
    elif kind == 4:  # the image itself, shifted
        src = np.roll(x, (int(rng.integers(h // 8, h - h // 8 + 1)), int(rng.integers(w // 8, w - w // 8 + 1))),
                      axis=(0, 1))
    else:  # the image itself, rotated about its centre
        src = ndimage.rotate(x, rng.uniform(20, 340), axes=(0, 1), reshape=False, mode="reflect", order=1)
    return _blend(x, src, mask, beta), mask


def simulate_ct_defect(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like defect (:func:`ct_defect`) blended into ``x`` (H, W, C): (corrupted image, mask)."""
    src, mask = ct_defect(x, rng)
    return _blend(x, src, mask, rng.uniform(0.0, 0.6)), mask


def simulate_warp(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A local deformation of ``x`` (H, W, C): inside a Perlin or blob region, the image's own content
    displaced by a smooth random field (smoothness 2 px per 64 px of the short side, displacement 2 to 6
    px per 128 px), blended in as the other defects are: (corrupted image, mask). Not used in training.

    Example:
        >>> x = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))[..., None]
        >>> y, mask = simulate_warp(np.sin(8 * x) ** 2, np.random.default_rng(0))
        >>> y.shape, bool(mask.any()), bool(np.abs(y - np.sin(8 * x) ** 2)[mask].max() > 0.05)
        ((64, 64, 1), True, True)
    """
    h, w = x.shape[:2]
    mask = perlin_mask((h, w), rng) if rng.random() < 0.5 else blob_mask((h, w), rng)
    sigma, amp = 2.0 * max(1.0, min(h, w) / 64), rng.uniform(2.0, 6.0) * max(1.0, min(h, w) / 128)
    field = [ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma) for _ in range(2)]
    dy, dx = (f * amp / (f.std() + 1e-8) for f in field)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    src = np.stack([ndimage.map_coordinates(x[..., c], [yy + dy, xx + dx], order=1, mode="reflect")
                    for c in range(x.shape[2])], axis=-1)
    return _blend(x, src.astype(np.float32), mask, rng.uniform(0.0, 0.4)), mask


def _blend(x: np.ndarray, src: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """``src`` inside the (softened) mask, a share ``beta`` of ``x`` kept there; ``x`` elsewhere."""
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 0.7)[..., None]
    out = x * (1 - soft) + (beta * x + (1 - beta) * src) * soft
    return np.clip(out, 0, 1).astype(np.float32)
