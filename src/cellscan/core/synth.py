"""Synthetic CT cross-sections of cylindrical EV cells, with defects and pixel masks.

A slice shows the steel can (bright ring), the jelly roll (an Archimedean spiral of alternating
electrode/separator layers), the hollow centre pin, and the CT look: detector blur, quantum noise,
ring artefacts about the rotation axis and beam-hardening cupping. Every slice jitters geometry
and intensity a little, so the model must learn the product, not one picture.

Defects (each with its binary mask):

- ``void``: gas pocket, a dark ellipse inside the winding
- ``crack``: a thin dark random-walk line across layers
- ``particle``: bright metal particles (high attenuation)
- ``misaligned``: a local bulge of the winding (deformed or shifted layers)

Generation is deterministic: slice ``i`` of a split depends only on ``(seed, split, i)``.

Example:
    >>> from cellscan.core.synth import render_slice
    >>> import numpy as np
    >>> img, mask = render_slice(np.random.default_rng(0), 64, defect="void")
    >>> img.shape, bool(mask.any())
    ((64, 64), True)
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cellscan.core.images import save_png
from cellscan.errors import ConfigError

logger = logging.getLogger(__name__)

DEFECTS: tuple[str, ...] = ("void", "crack", "particle", "misaligned")


@dataclass(frozen=True)
class _Geometry:
    cx: float
    cy: float
    r_can: float
    r_roll: float
    r_pin: float
    pitch: float
    phase: float


def _geometry(rng: np.random.Generator, size: int) -> _Geometry:
    s = float(size)
    return _Geometry(
        cx=s / 2 + rng.normal(0, 0.01 * s),
        cy=s / 2 + rng.normal(0, 0.01 * s),
        r_can=s * rng.uniform(0.44, 0.46),
        r_roll=s * rng.uniform(0.405, 0.415),
        r_pin=s * rng.uniform(0.045, 0.055),
        pitch=s * rng.uniform(0.028, 0.032),
        phase=rng.uniform(0, 2 * np.pi),
    )


def _polar(g: _Geometry, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - g.cx, yy - g.cy
    return np.hypot(dx, dy), np.arctan2(dy, dx)


def _blob(rng: np.random.Generator, size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """A rotated ellipse with a wobbly edge, as a boolean mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    ang = rng.uniform(0, np.pi)
    x = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
    y = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
    theta = np.arctan2(y, x)
    wobble = 1 + 0.15 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.08 * np.sin(5 * theta + rng.uniform(0, 6.3))
    return (x / rx) ** 2 + (y / ry) ** 2 <= wobble**2


def _point_in_roll(rng: np.random.Generator, g: _Geometry, lo: float = 0.3, hi: float = 0.85) -> tuple[float, float]:
    r = g.r_roll * rng.uniform(lo, hi)
    t = rng.uniform(0, 2 * np.pi)
    return g.cx + r * np.cos(t), g.cy + r * np.sin(t)


def render_slice(
    rng: np.random.Generator, size: int = 128, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one CT slice.

    Args:
        rng: the random generator (fixes the slice).
        size: side in pixels.
        defect: ``None`` for a normal cell, or one of :data:`DEFECTS`.

    Returns:
        ``(image, mask)``: float32 (size, size) in [0, 1] and a bool mask of the defect.
    """
    if defect is not None and defect not in DEFECTS:
        msg = f"unknown defect {defect!r}; expected one of {', '.join(DEFECTS)}"
        raise ConfigError(msg)
    g = _geometry(rng, size)
    r, theta = _polar(g, size)
    mask = np.zeros((size, size), dtype=bool)

    # Winding phase: an Archimedean spiral, one layer per pitch.
    wind = (r - g.r_pin) / g.pitch - (theta + g.phase) / (2 * np.pi)
    if defect == "misaligned":
        # A bulge of the winding: layers pushed outward in one angular sector.
        t0 = rng.uniform(-np.pi, np.pi)
        r0 = g.r_roll * rng.uniform(0.4, 0.75)
        width_t, width_r = rng.uniform(0.25, 0.45), g.r_roll * rng.uniform(0.12, 0.2)
        dt = np.angle(np.exp(1j * (theta - t0)))
        bump = np.exp(-0.5 * (dt / width_t) ** 2 - 0.5 * ((r - r0) / width_r) ** 2)
        shift = rng.uniform(0.45, 0.6) * rng.choice([-1.0, 1.0])
        wind = wind + shift * bump
        mask |= (bump > 0.35) & (r < g.r_roll)
    layers = 0.5 + 0.5 * np.cos(2 * np.pi * wind)
    layers = layers**1.5  # thin bright current collectors, wider dark separators

    img = np.full((size, size), 0.08)  # air
    roll = (r >= g.r_pin * 1.5) & (r <= g.r_roll)
    img = np.where(roll, 0.30 + 0.35 * layers, img)
    can = (r > g.r_roll + 0.01 * size) & (r <= g.r_can)
    img = np.where(can, 0.88, img)
    pin = (r > g.r_pin) & (r < g.r_pin * 1.5)
    img = np.where(pin, 0.80, img)
    img = np.where(r <= g.r_pin, 0.12, img)  # hollow pin

    if defect == "void":
        cx, cy = _point_in_roll(rng, g)
        rr = size * rng.uniform(0.03, 0.06)
        m = _blob(rng, size, cx, cy, rr, rr * rng.uniform(0.5, 1.0))
        img = np.where(m, 0.10 + 0.05 * rng.random(), img)
        mask |= m
    elif defect == "crack":
        x, y = _point_in_roll(rng, g, 0.25, 0.7)
        heading = rng.uniform(0, 2 * np.pi)
        steps = int(size * rng.uniform(0.25, 0.4))
        pts = []
        for _ in range(steps):
            heading += rng.normal(0, 0.25)
            x, y = x + np.cos(heading), y + np.sin(heading)
            pts.append((x, y))
        line = np.zeros((size, size), dtype=bool)
        for px, py in pts:
            ix, iy = int(round(px)), int(round(py))
            if 0 <= ix < size and 0 <= iy < size:
                line[iy, ix] = True
        line = ndimage.binary_dilation(line, iterations=max(1, size // 96)) & (r < g.r_can)
        img = np.where(line, 0.07, img)
        mask |= line
    elif defect == "particle":
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = _point_in_roll(rng, g, 0.2, 0.95)
            rr = size * rng.uniform(0.012, 0.025)
            m = _blob(rng, size, cx, cy, rr, rr)
            img = np.where(m, 1.0, img)
            mask |= m

    # Beam-hardening cupping (centre darker) and streaks from dense particles.
    img = img * (1.0 - 0.08 * np.exp(-((r / (0.5 * g.r_can)) ** 2)))
    # Ring artefacts: faint concentric rings about the rotation axis.
    rings = np.zeros_like(r)
    for _ in range(int(rng.integers(2, 6))):
        rr = rng.uniform(0.1, 0.45) * size
        rings += rng.normal(0, 0.03) * np.exp(-0.5 * ((r - rr) / 0.6) ** 2)
    img = img + rings
    # Detector blur, then quantum noise.
    img = ndimage.gaussian_filter(img, sigma=0.6 * size / 128)
    img = img + rng.normal(0, 0.025, img.shape) * np.sqrt(np.clip(img, 0.05, 1.0))
    img = img * rng.uniform(0.95, 1.05) + rng.uniform(-0.02, 0.02)
    if mask.any():
        mask = ndimage.binary_dilation(mask, iterations=1) if defect == "particle" else mask
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask


def _rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), i])


def generate(
    root: Path,
    *,
    layout: str = "mvtec",
    size: int = 128,
    n_train: int = 160,
    n_test_good: int = 40,
    n_per_defect: int = 10,
    defects: tuple[str, ...] = DEFECTS,
    seed: int = 42,
    bit_depth: int = 16,
) -> dict[str, int]:
    """Write a synthetic dataset under ``root``.

    Args:
        root: the category folder to create (for example ``data/cells``).
        layout: ``"mvtec"`` (train/good, test/good, test/<defect>, ground_truth/<defect>) or
            ``"roles"`` (training/, validation/, anomaly/, temp/ with masks under ground_truth/).
        size: side of each slice in pixels.
        n_train, n_test_good, n_per_defect: counts per split.
        defects: which defect types to generate.
        seed: the seed; equal arguments give byte-identical files.
        bit_depth: 8 or 16-bit PNG.

    Returns:
        Counts of files written per folder.
    """
    from cellscan.core.data import folder_for  # local import: data imports images only

    if layout not in ("mvtec", "roles"):
        msg = f"unknown layout {layout!r}; expected 'mvtec' or 'roles'"
        raise ConfigError(msg)
    counts: dict[str, int] = {}

    def write(split: str, defect: str | None, i: int, folder: str) -> None:
        img, mask = render_slice(_rng(seed, split, i), size, defect)
        name = f"{split}_{i:04d}.png"
        save_png(img, root / folder / name, bit_depth)
        if defect is not None:
            save_png(mask.astype(np.float32), root / "ground_truth" / defect / f"{split}_{i:04d}_mask.png", 8)
        counts[folder] = counts.get(folder, 0) + 1

    for i in range(n_train):
        write("train", None, i, folder_for(layout, "train"))
    for i in range(n_test_good):
        write("good", None, i, folder_for(layout, "validation"))
    for defect in defects:
        for i in range(n_per_defect):
            write(defect, defect, i, folder_for(layout, "anomaly", defect))
    if layout == "roles":
        (root / "temp").mkdir(parents=True, exist_ok=True)
    logger.info("synthetic dataset written to %s: %s", root, counts)
    return counts
