"""Anomaly maps, image scores and thresholds from the reconstruction error, the head's map and a whole-image
view (numpy only).

The pixel map is the reconstruction error (squared error, 1 - SSIM, or both), standardised
per pixel by the error that normal hold-out images show at that position, then smoothed. The image
score (``reconstruction_error``) aggregates the map: its mean, its maximum or the mean of its top-k
share of pixels.

The networks see local windows; what is wrong with a whole image (a shifted electrode stack, a shape
that is another shape) shows in :class:`GlobalView`: the image brought down to a few hundred pixels and
projected on the principal components of the training normals; its residual is a third image score.

Small defects that the reconstruction copies (a pore, a hairline crack in a textured tile) show in
:class:`PatchView`: small windows of the contrast-normalised image compared with a memory bank of
windows from the training normals; the distance to the nearest one, standardised by what normals show
at that place, at the worst place, is a fourth. A region whose grain or direction differs from every
normal one (an uneven glaze, a frayed edge) shows in :class:`TextureView`: pooled Gaussian-derivative
energies at each place compared with a bank of normal textures, standardised alike; a fifth.
:func:`fuse` weighs the views by how well each tells simulated defects from normals, and adds the two
place views' maps to the network's in the heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from scipy import ndimage

from cellscan.core.config import ScoreParams
from cellscan.errors import ConfigError

_C1, _C2 = 0.01**2, 0.03**2


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes of (N, H, W) or (N, H, W, C)."""
    spatial = (0, sigma, sigma) + ((0,) if a.ndim == 4 else ())
    return ndimage.gaussian_filter(a, sigma=spatial, mode="reflect", truncate=3.5)


def ssim_map(x: np.ndarray, y: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel SSIM of two (N, H, W, C) batches in [0, 1], averaged over channels: (N, H, W).

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).random((1, 16, 16, 1)).astype(np.float32)
        >>> float(ssim_map(a, a).min()) > 0.999   # identical images
        True
    """
    # Centred on 0.5: the local variances below are differences of close numbers, and centring
    # halves their magnitude (the exported maps graph does the same in float32).
    x = x.astype(np.float64) - 0.5
    y = y.astype(np.float64) - 0.5
    # The five local means in one filter call.
    spatial = (0, 0, sigma, sigma) + ((0,) if x.ndim == 4 else ())
    mx, my, xx, yy, xy = ndimage.gaussian_filter(np.stack([x, y, x * x, y * y, x * y]), sigma=spatial,
                                                 mode="reflect", truncate=3.5)
    sxx = xx - mx * mx
    syy = yy - my * my
    sxy = xy - mx * my
    mx, my = mx + 0.5, my + 0.5
    s = ((2 * mx * my + _C1) * (2 * sxy + _C2)) / ((mx * mx + my * my + _C1) * (sxx + syy + _C2))
    return s.mean(axis=-1).astype(np.float32)


def raw_maps(x: np.ndarray, recon: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """Unnormalised error maps (N, H, W) of each component that ``kind`` uses."""
    out: dict[str, np.ndarray] = {}
    if kind in ("l2", "l2_ssim"):
        out["l2"] = ((x - recon) ** 2).mean(axis=-1).astype(np.float32)
    if kind in ("ssim", "l2_ssim"):
        out["ssim"] = (1.0 - ssim_map(x, recon)) / 2.0
    return out


@dataclass
class MapStats:
    """Per-pixel mean and spread of normal error maps, one pair per component."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]

    @classmethod
    def fit(cls, maps: dict[str, np.ndarray]) -> MapStats:
        """Estimate from the raw maps of normal hold-out images (smoothed, with a floor on the spread)."""
        mean, std = {}, {}
        for k, m in maps.items():
            mu = m.mean(axis=0)
            sd = np.sqrt(ndimage.gaussian_filter(m.var(axis=0), 1.0))
            # A floor keeps pixels that happened to vary little in a small hold-out from exploding.
            floor = max(0.5 * float(np.median(sd)), 0.1 * float(sd.mean()), 1e-6)
            mean[k], std[k] = mu.astype(np.float32), np.maximum(sd, floor).astype(np.float32)
        return cls(mean, std)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f"{k}_mean": v for k, v in self.mean.items()} | {f"{k}_std": v for k, v in self.std.items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MapStats:
        mean = {k[:-5]: v for k, v in arrays.items() if k.endswith("_mean")}
        std = {k[:-4]: v for k, v in arrays.items() if k.endswith("_std")}
        return cls(mean, std)


def anomaly_maps(x: np.ndarray, recon: np.ndarray, p: ScoreParams, stats: MapStats | None = None) -> np.ndarray:
    """Pixel anomaly maps (N, H, W): standardised error components, averaged, then smoothed."""
    parts = raw_maps(x, recon, p.map)
    combined = np.zeros(x.shape[:3], dtype=np.float32)
    for k, m in parts.items():
        if p.normalize and stats is not None and k in stats.mean:
            m = (m - stats.mean[k]) / stats.std[k]
        combined += m / len(parts)
    if p.smooth_sigma > 0:
        combined = _blur(combined, p.smooth_sigma).astype(np.float32)
    return combined


def maps_key(p: ScoreParams) -> dict[str, Any]:
    """The score parameters that decide the pixel maps (another runtime's maps are used only for these)."""
    return {"map": p.map, "normalize": bool(p.normalize), "smooth_sigma": float(p.smooth_sigma),
            "head_sigma": float(p.head_sigma)}


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of (N, H, W) maps (sigma 0: unchanged)."""
    return _blur(maps, sigma).astype(np.float32) if sigma > 0 else maps.astype(np.float32)


class GlobalView:
    """The whole image at a few hundred pixels, against the principal components of normal images.

    Two readings of one projection, as in multivariate process monitoring: the squared residual (the
    part of the image outside the normals' principal subspace; SPE or Q) and Hotelling's T^2 (how far
    the image's coordinates inside that subspace lie from the normals', each component by its own
    spread). A shape that is another shape can sit mostly *inside* the subspace (a 7 is largely made of a
    9's strokes), where only T^2 sees it; a shadow or a shift that no normal shows sits outside it. The
    image score adds the two, each over its mean on the fitting normals (Yue and Qin's combined index
    with means for limits), so each reads about 1 on a normal image. Views saved before T^2 (no
    ``spread``) score the residual alone, as they did. ``side`` is the long side of the small view; the
    short side keeps the working aspect ratio.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> normals = np.repeat(np.linspace(0, 1, 16)[None, :, None, None], 40, 0) * np.ones((1, 16, 16, 1))
        >>> normals = (normals + 0.01 * rng.standard_normal(normals.shape)).astype(np.float32)
        >>> g = GlobalView.fit(normals, side=8)
        >>> other = normals[:1].transpose(0, 2, 1, 3)   # the gradient turned by a quarter
        >>> bool(g.scores(other)[0] > 10 * g.scores(normals[:5]).max())
        True
        >>> small = normals[:, ::2, ::2]   # 8 x 8: the view is the image itself
        >>> g = GlobalView.fit(small, side=8)
        >>> far = small[:1] + 30 * g.spread[0] * g.components[0].reshape(1, 8, 8, 1)   # inside the subspace
        >>> residual, t2 = g._readings(g._small(far))
        >>> bool(residual[0] < 2 * g.norms[0]), bool(g.scores(far)[0] > 3 * g.scores(small[:5]).max())
        (True, True)
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray, shape: tuple[int, int],
                 spread: np.ndarray | None = None, norms: tuple[float, float] | None = None) -> None:
        self.mean, self.components, self.shape = mean, components, (int(shape[0]), int(shape[1]))
        # each component's spread on the fitting normals, and the residual's and T^2's means there;
        # None in views saved before T^2
        self.spread, self.norms = spread, norms

    @staticmethod
    def small_shape(shape: tuple[int, int], side: int) -> tuple[int, int]:
        h, w = shape
        scale = min(1.0, side / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def _small(self, x: np.ndarray) -> np.ndarray:
        from cellscan.core.images import resize

        return np.stack([resize(a, self.shape) for a in x]).reshape(len(x), -1).astype(np.float64)

    @classmethod
    def fit(cls, x: np.ndarray, side: int = 32, variance: float = 0.95) -> GlobalView:
        """Fit on normal images (N, H, W, C): keep the components that explain ``variance`` of their spread."""
        view = cls(np.zeros(0), np.zeros((0, 0)), cls.small_shape(x.shape[1:3], side))
        flat = view._small(x)
        view.mean = flat.mean(axis=0)
        _, s, vt = np.linalg.svd(flat - view.mean, full_matrices=False)
        share = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-12)
        k = min(int(np.searchsorted(share, variance)) + 1, len(s))
        view.components = vt[:k]
        total = float(np.sum(s**2)) / max(len(flat) - 1, 1)
        # A floor on both: a component (or a residual) that hardly varies on few normals must not explode.
        view.spread = np.maximum(s[:k] / np.sqrt(max(len(flat) - 1, 1)), max(np.sqrt(1e-6 * total), 1e-3))
        residual = view._readings(flat)[0]  # T^2 averages about k there by construction
        view.norms = (max(float(residual.mean()), 1e-3 * total / flat.shape[1], 1e-12), float(k))
        return view

    def _readings(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean squared residual, T^2) of flattened small images (N, pixels)."""
        d = flat - self.mean
        z = d @ self.components.T
        res = d - z @ self.components
        t2 = ((z / self.spread) ** 2).sum(axis=1) if self.spread is not None else np.zeros(len(d))
        return (res**2).mean(axis=1), t2

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Each image's score (N,): residual and T^2 each over its normal mean, added (views saved before
        T^2: the mean squared residual)."""
        residual, t2 = self._readings(self._small(x))
        if self.spread is None or self.norms is None:
            return residual.astype(np.float32)
        return (residual / self.norms[0] + t2 / self.norms[1]).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean, "components": self.components, "shape": np.array(self.shape)}
        if self.spread is not None and self.norms is not None:
            out |= {"spread": self.spread, "norms": np.array(self.norms)}
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> GlobalView:
        shape = (int(a["shape"][0]), int(a["shape"][1]))
        if "spread" in a:
            return cls(a["mean"], a["components"], shape, a["spread"], (float(a["norms"][0]), float(a["norms"][1])))
        return cls(a["mean"], a["components"], shape)


def place_scores(place_maps: np.ndarray) -> np.ndarray:
    """Image scores (N,) of a place view's maps (N, h, w): each map's largest value."""
    g = place_maps
    return g.reshape(len(g), -1).max(axis=1).astype(np.float32) if len(g) else np.zeros(0, np.float32)


class _PlaceView:
    """What the patch and texture views share: the image prepared alike (grayscale at a long side of
    ``side`` pixels, slow brightness changes removed, local contrast equalised), a feature vector at each
    place of a grid, a bank of normal places' features, the distance of each place to its nearest bank
    entry, standardised by the mean and spread that training normals show at that place, and the image
    score: the largest standardised distance after a small smoothing.

    A subclass says what a place's features are (:meth:`_features`) and how they are fitted (``fit``);
    a place's query is ``(features - mean) @ components.T``.
    """

    HIGHPASS, CONTRAST, EPS = 8.0, 16.0, 0.02
    MIN_SIDE = 64  # smaller working images (digits, thumbnails): a window is most of the object
    POSITION_IMAGES = 512  # training normals that measure each place's normal distances (a random subset)

    def __init__(self, mean: np.ndarray, components: np.ndarray, bank: np.ndarray, shape: tuple[int, int],
                 position: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.mean, self.components, self.bank = mean, components, bank
        self.shape = (int(shape[0]), int(shape[1]))
        # each place's (mean, spread) of the smoothed distance on normals; None in models saved before it
        self.position = position

    def _prep(self, x: np.ndarray) -> np.ndarray:
        from cellscan.core.images import resize

        g = x.mean(axis=-1) if x.ndim == 4 else x
        if g.shape[1:3] != self.shape:
            g = np.stack([resize(a[..., None], self.shape)[..., 0] for a in g])
        g = g.astype(np.float32)
        hp = g - ndimage.gaussian_filter(g, (0, self.HIGHPASS, self.HIGHPASS), mode="reflect")
        rms = np.sqrt(ndimage.gaussian_filter(hp * hp, (0, self.CONTRAST, self.CONTRAST), mode="reflect"))
        return hp / (rms + self.EPS)

    def _features(self, a: np.ndarray) -> np.ndarray:
        """(H, W) prepared image -> (h, w, features) at each place of the grid."""
        raise NotImplementedError

    def _fit_positions(self, prepped: np.ndarray, owner: np.ndarray, rng: np.random.Generator) -> None:
        """Each place's normal distances, measured on up to ``POSITION_IMAGES`` of the fitting images,
        each against the bank without its own entries (``owner``: the image each bank entry came from)."""
        some = np.sort(rng.choice(len(prepped), min(self.POSITION_IMAGES, len(prepped)), replace=False))
        grids = np.stack([self._grid_one(prepped[i], skip=owner == i) for i in some])
        self.position = self._position_stats(ndimage.gaussian_filter(grids, (0, 1.0, 1.0), mode="reflect"))

    @staticmethod
    def _position_stats(grids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Each place's mean and spread over smoothed normal grids (N, h, w), both smoothed over
        neighbouring places, the spread floored at half its median; None where they cannot be measured."""
        if len(grids) < 2 or not np.isfinite(grids).all():
            return None
        mean = ndimage.gaussian_filter(grids.mean(axis=0), 1.0, mode="reflect")
        sd = np.sqrt(ndimage.gaussian_filter(grids.var(axis=0), 1.0, mode="reflect"))
        sd = np.maximum(sd, max(0.5 * float(np.median(sd)), 1e-6))
        return mean.astype(np.float32), sd.astype(np.float32)

    def _nearest(self, q: np.ndarray, **search: Any) -> np.ndarray:
        """Distances (n,) of queries (n, d) to their nearest bank entries (each view searches its own way)."""
        raise NotImplementedError

    def _grid_one(self, a: np.ndarray, **search: Any) -> np.ndarray:
        """Nearest-bank distances (h, w) of the places of one prepared image (``search``: how the fit
        leaves an image's own entries out, passed to :meth:`_nearest`)."""
        f = self._features(a)
        q = (f.reshape(-1, f.shape[-1]) - self.mean) @ self.components.T
        return self._nearest(q, **search).reshape(f.shape[:2])

    def grid(self, x: np.ndarray) -> np.ndarray:
        """Nearest-bank distances of every place: (N, h, w)."""
        if len(x) == 0:
            return np.zeros((0, 1, 1), np.float32)
        return np.stack([self._grid_one(a) for a in self._prep(x)])

    def place_maps(self, x: np.ndarray) -> np.ndarray:
        """Each place's distance after a Gaussian smoothing (sigma 1 place), standardised at its place
        (views saved without place statistics use the distance as it is): (N, h, w)."""
        g = ndimage.gaussian_filter(self.grid(x), (0, 1.0, 1.0), mode="reflect")
        if self.position is not None:
            g = (g - self.position[0]) / self.position[1]
        return g.astype(np.float32)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """The image score (N,): the largest value of :meth:`place_maps`."""
        return place_scores(self.place_maps(x))

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean, "components": self.components, "bank": self.bank, "shape": np.array(self.shape)}
        if self.position is not None:
            out |= {"position_mean": self.position[0], "position_std": self.position[1]}
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Self:
        shape = (int(a["shape"][0]), int(a["shape"][1]))
        position = (a["position_mean"], a["position_std"]) if "position_mean" in a else None
        return cls(a["mean"], a["components"], a["bank"], shape, position)


class PatchView(_PlaceView):
    """Windows of the image against the nearest windows of normal images (a memory bank, no pretraining).

    The image is brought to a long side of ``side`` pixels (at most its own), grayscale; its slow
    brightness changes are removed (minus a Gaussian blur, sigma ``HIGHPASS``) and its local contrast
    is equalised (divided by the local RMS, sigma ``CONTRAST``), so that a bright and a dark normal image
    look alike and a dark pore looks the same on either. Windows of ``PATCH`` pixels every ``STRIDE``
    pixels, minus their own mean, are projected on their first ``COMPONENTS`` principal components; the
    bank keeps ``BANK`` windows of the training normals. A window's distance is the distance to its
    nearest bank window. Some places vary more in normal images than others (the edges of a tile, the
    rim of a weld), so each place's distance is standardised by the mean and spread that training
    normals show there, each measured against the bank without its own windows; the image score is the
    largest standardised distance after a small smoothing.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> normals = (0.5 + 0.05 * rng.standard_normal((12, 32, 32, 1))).astype(np.float32)
        >>> v = PatchView.fit(normals, side=32)
        >>> pore = normals[:2].copy(); pore[1, 12:16, 12:16] = 0.0   # a dark 4-pixel pore in image 1
        >>> s = v.scores(pore)
        >>> bool(s[1] > 1.5 * s[0])
        True
    """

    PATCH, STRIDE, COMPONENTS, BANK = 8, 2, 16, 4096

    def __init__(self, mean: np.ndarray, components: np.ndarray, bank: np.ndarray, shape: tuple[int, int],
                 position: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__(mean, components, bank, shape, position)
        self._bank_sq = (bank.astype(np.float32) ** 2).sum(axis=1)
        self._bank_t = np.ascontiguousarray(bank.T)  # once, not per scored image

    def _nearest(self, q: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        """Exact nearest distances by one matrix product per chunk; bank windows where ``skip`` is true
        are left out (a training image is not measured against its own windows)."""
        d = np.empty(len(q), np.float32)
        chunk = max(64, 2**23 // max(len(self.bank), 1))  # places at a time: a 32 MiB distance block
        for i in range(0, len(q), chunk):
            qi = q[i : i + chunk]
            m = qi @ self._bank_t
            m *= -2.0
            m += self._bank_sq
            if skip is not None:
                m[:, skip] = np.inf
            d[i : i + chunk] = m.min(axis=1) + (qi * qi).sum(axis=1)
        return np.sqrt(np.maximum(d, 0.0))

    @classmethod
    def _windows(cls, a: np.ndarray) -> np.ndarray:
        """(H, W) -> (h, w, PATCH * PATCH) windows minus their own mean."""
        w = np.lib.stride_tricks.sliding_window_view(a, (cls.PATCH, cls.PATCH))[:: cls.STRIDE, :: cls.STRIDE]
        w = w.reshape(*w.shape[:2], -1)
        return w - w.mean(axis=-1, keepdims=True)

    _features = _windows

    @classmethod
    def usable(cls, shape: tuple[int, int], side: int = 128) -> bool:
        """Whether a working size gets a patch view: its short side at least ``MIN_SIDE`` and, brought to
        ``side``, still two windows high (a very long, thin image would leave none)."""
        return min(shape) >= cls.MIN_SIDE and min(GlobalView.small_shape(shape, side)) >= 2 * cls.PATCH

    @classmethod
    def fit(cls, x: np.ndarray, side: int = 128, seed: int = 0) -> PatchView:
        """Fit on normal images (N, H, W, C): principal components of their windows, the bank, and the
        normal distances at each place."""
        shape = GlobalView.small_shape(x.shape[1:3], side)
        view = cls(np.zeros(0, np.float32), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), shape)
        rng = np.random.default_rng(seed)
        per = max(1, -(-4 * cls.BANK // len(x)))
        prepped = view._prep(x)
        sample, source = [], []
        for i, a in enumerate(prepped):
            w = cls._windows(a).reshape(-1, cls.PATCH * cls.PATCH)
            sample.append(w[rng.choice(len(w), min(per, len(w)), replace=False)])
            source.append(np.full(len(sample[-1]), i))
        flat = np.concatenate(sample).astype(np.float64)
        mean = flat.mean(axis=0).astype(np.float32)
        _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
        components = vt[: cls.COMPONENTS].astype(np.float32)
        pick = rng.choice(len(flat), min(cls.BANK, len(flat)), replace=False)
        view = cls(mean, components, (flat[pick].astype(np.float32) - mean) @ components.T, shape)
        view._fit_positions(prepped, np.concatenate(source)[pick], rng)
        return view


class TextureView(_PlaceView):
    """The local texture at each place against the textures of normal images (a memory bank, no pretraining).

    Prepared as the patch view is, the image is filtered with Gaussian derivatives (first and second
    order in both directions and mixed, ``ORDERS``) at ``SCALES`` pixels (stored with the view: views saved
    before that were fitted at the first three); each filter's energy, pooled
    over a neighbourhood (sigma ``POOL``), is taken as its share of the total (how the texture is made:
    grainy or smooth, streaked one way or the other) beside the total itself (how strong it is), all in
    logs. Each feature is standardised over the normals' places and the place is kept as its first
    ``DIMS`` principal components (16 of 26 keep 99.6% of the variance, 16 of the 21 of four scales
    99.8%; the k-d tree searches 16 dimensions 2.5 times faster than 21). The bank holds the places of
    the training normals every ``STRIDE`` pixels, all of them up to ``BANK`` (rare normal textures count: on
    the magnetic tiles this view scored 0.78 image AUROC with 8,192 places, 0.89 with 65,536, 0.92 with all
    621,000, at three scales; the fourth, 8 pixels, which sees the grain of larger structures such as a weld's
    bead or a tile's glaze, took that to 0.949 with 262,144 places, and the weld radiographs from 0.831 to
    0.856; with 16 components all 621,000 places fit in less time: 0.955; the fifth, half a pixel, which sees
    the finest grain left at the working size (a hairline crack, a fray's fibres), to 0.965 with the welds
    unchanged), searched with a k-d tree.
    Views saved before keep their per-feature scaling (``components`` is then diagonal) and score as
    they did. Each place's distance to its nearest normal texture
    is standardised at its place as in :class:`PatchView`, the normal distances measured by ``FOLDS``
    folds of the training images, each against the bank without its own places. Where the patch view
    compares shapes window by window, this view sees a region whose grain or direction differs from
    every normal one (an uneven glaze, a frayed edge, a blowhole's rim) even when no window looks unusual.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> normals = ndimage.gaussian_filter(rng.standard_normal((12, 64, 64)), (0, 0.5, 3.0))[..., None]
        >>> v = TextureView.fit((0.5 + normals).astype(np.float32), side=64)   # streaks along x
        >>> odd = (0.5 + normals[:2]).astype(np.float32); odd[1, 20:44, 20:44] = odd[1, 20:44, 20:44].transpose(1, 0, 2)
        >>> s = v.scores(odd)   # image 1: a square whose streaks run along y
        >>> bool(s[1] > s[0] + 3)
        True
    """

    SCALES, POOL, STRIDE, BANK, DIMS, FOLDS, FLOOR = (0.5, 1.0, 2.0, 4.0, 8.0), 8.0, 4, 1_048_576, 16, 4, 1e-4
    SAVED_BEFORE_SCALES = (1.0, 2.0, 4.0)  # the scales of views saved before the scales were stored with them
    ORDERS = ((0, 1), (1, 0), (0, 2), (2, 0), (1, 1))

    def __init__(self, mean: np.ndarray, components: np.ndarray, bank: np.ndarray, shape: tuple[int, int],
                 position: tuple[np.ndarray, np.ndarray] | None = None,
                 scales: tuple[float, ...] | None = None) -> None:
        super().__init__(mean, components, bank, shape, position)
        self.scales = tuple(float(v) for v in (self.SCALES if scales is None else scales))
        self._tree: Any = None  # built on first use (a few tenths of a second for the largest bank)

    def _features(self, a: np.ndarray) -> np.ndarray:
        energy = []
        for s in self.scales:
            for o in self.ORDERS:  # scale-normalised, so that every scale's energy counts alike
                r = ndimage.gaussian_filter(a, s, order=o, mode="reflect") * s ** sum(o)
                energy.append(r * r)
        e = ndimage.gaussian_filter(np.stack(energy), (0, self.POOL, self.POOL), mode="reflect")
        e = e[:, self.STRIDE // 2 :: self.STRIDE, self.STRIDE // 2 :: self.STRIDE]
        total = e.sum(axis=0)
        f = np.concatenate([np.log(e / (total + 1e-12) + self.FLOOR), np.log(total + self.FLOOR)[None]])
        return np.moveaxis(f, 0, -1).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return super().to_arrays() | {"scales": np.array(self.scales, np.float32)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Self:
        view = super().from_arrays(a)
        view.scales = tuple(float(v) for v in a["scales"]) if "scales" in a else cls.SAVED_BEFORE_SCALES
        return view

    def _nearest(self, q: np.ndarray, tree: Any = None) -> np.ndarray:
        """Nearest distances searched in ``tree`` (by default the whole bank's; the fit passes a tree
        without one fold's places)."""
        from scipy.spatial import cKDTree

        if tree is None:
            if self._tree is None:
                self._tree = cKDTree(self.bank)
            tree = self._tree
        d, _ = tree.query(q, k=1, workers=-1)  # all cores: the same distances, sooner
        return d.astype(np.float32)

    def _fit_positions(self, prepped: np.ndarray, owner: np.ndarray, rng: np.random.Generator) -> None:
        """Each place's normal distances on up to ``POSITION_IMAGES`` fitting images, each searched in a
        tree of the bank without its fold's places (``owner``: the image each bank place came from)."""
        from scipy.spatial import cKDTree

        some = np.sort(rng.choice(len(prepped), min(self.POSITION_IMAGES, len(prepped)), replace=False))
        fold = rng.integers(0, self.FOLDS, len(prepped))
        grids: list[np.ndarray | None] = [None] * len(some)
        for k in range(self.FOLDS):
            keep = fold[owner] != k
            if not keep.any():
                continue
            tree = cKDTree(self.bank[keep])
            for j, i in enumerate(some):
                if fold[i] == k:
                    grids[j] = self._grid_one(prepped[i], tree=tree)
        got = [g for g in grids if g is not None]
        self.position = self._position_stats(ndimage.gaussian_filter(np.stack(got), (0, 1.0, 1.0), mode="reflect")
                                             ) if len(got) > 1 else None

    @classmethod
    def usable(cls, shape: tuple[int, int], side: int = 128) -> bool:
        """Whether a working size gets a texture view: its short side at least ``MIN_SIDE`` and, brought
        to ``side``, at least four places high."""
        return min(shape) >= cls.MIN_SIDE and min(GlobalView.small_shape(shape, side)) >= 4 * cls.STRIDE

    @classmethod
    def fit(cls, x: np.ndarray, side: int = 128, seed: int = 0) -> TextureView:
        """Fit on normal images (N, H, W, C): each feature's spread, the bank, and the normal distances
        at each place."""
        shape = GlobalView.small_shape(x.shape[1:3], side)
        view = cls(np.zeros(0, np.float32), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), shape)
        rng = np.random.default_rng(seed)
        prepped = view._prep(x)
        feats = [view._features(a) for a in prepped]
        flat = np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats])
        owner = np.repeat(np.arange(len(feats)), [f.shape[0] * f.shape[1] for f in feats])
        if len(flat) > cls.BANK:
            pick = np.sort(rng.choice(len(flat), cls.BANK, replace=False))
            flat, owner = flat[pick], owner[pick]
        mean = flat.mean(axis=0, dtype=np.float64)
        scale = 1.0 / np.maximum(flat.std(axis=0, dtype=np.float64), 1e-3)
        components = (cls._axes(((flat - mean) * scale).astype(np.float32)) * scale).astype(np.float32)
        mean = mean.astype(np.float32)
        view = cls(mean, components, (flat - mean) @ components.T, shape)
        view._fit_positions(prepped, owner, rng)
        return view

    @classmethod
    def _axes(cls, z: np.ndarray) -> np.ndarray:
        """The first ``DIMS`` principal axes (DIMS, features) of standardised features (n, features)."""
        cov = (z.T.astype(np.float64) @ z.astype(np.float64)) / max(len(z) - 1, 1)
        _, vectors = np.linalg.eigh(cov)  # ascending
        return vectors[:, ::-1][:, : min(cls.DIMS, z.shape[1])].T


VIEWS = ("global", "patch", "texture")  # the image views, in the order they join the fused score
MIN_VOTE = 0.25  # the least weight a view keeps in ``views`` (see :func:`view_weights`)


def separation(normal_scores: np.ndarray, defect_scores: np.ndarray) -> float:
    """How well a score tells simulated defects from normals: d' = sqrt(2) * probit(AUROC), 0 at chance or
    worse, at most 4.4 (AUROC clipped at 0.999, so one perfect view does not silence the others).

    d' is the shift of a unit-variance normal score that gives the same AUROC; for independent scores,
    weights proportional to it are the best linear combination (Fisher's), and it reads the AUROC by ranks,
    so a view's heavy tail on normals does not inflate it.

    Example:
        >>> round(separation(np.array([0.0, 1.0, 2.0]), np.array([1.5, 3.0, 4.0])), 3)   # AUROC 8/9
        1.726
        >>> separation(np.array([1.0, 2.0]), np.array([0.0, 1.5]))   # worse than chance
        0.0
    """
    from scipy.stats import norm, rankdata

    n0, n1 = len(normal_scores), len(defect_scores)
    if not (n0 and n1):
        return 0.0
    ranks = rankdata(np.concatenate([normal_scores, defect_scores]))
    auroc = (ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1)
    return float(max(0.0, np.sqrt(2.0) * norm.ppf(min(float(auroc), 0.999))))


def view_weights(separations: dict[str, float] | None, present: list[str], power: float = 1.0) -> dict[str, float]:
    """Each present part's weight in ``views`` (the image views, and ``"network"`` where the network was
    measured too): its separation raised to ``power`` over the mean of the present parts' (raised alike),
    at least ``MIN_VOTE``, then scaled so that they add up to one vote each on average; 1 each without
    separations or where none separates.

    ``power`` 1 weighs each standardised part by its separation, what would be best if the parts were
    independent and the simulated defects were the real ones. They are neither: on both real sets
    measured, one view told the real defects apart far better than the others while the simulated
    separations ranked the views right but squeezed their differences, so the fused score trailed its
    best view. The square (``score.separation_power`` 2, the default) gives the better-separating view the
    larger share: see the README's detection figures.

    The simulated defects are local (voids, particles, cracks, shifted bands, faint smudges), so a view
    made for what is wrong with a whole image is measured by them only in part: its separation can read
    near 0 on a set whose real defects it sees. The floor keeps such a view in the score at a quarter of a
    vote rather than silencing it.

    Example:
        >>> view_weights({"global": 0.4, "patch": 1.2, "texture": 1.4}, ["global", "patch", "texture"])
        {'global': 0.4, 'patch': 1.2, 'texture': 1.4}
        >>> w = view_weights({"global": 0.0, "patch": 1.2, "texture": 1.8}, ["global", "patch", "texture"])
        >>> {name: round(v, 3) for name, v in w.items()}   # global floored at 0.25 of a vote, then all scaled
        {'global': 0.231, 'patch': 1.108, 'texture': 1.662}
        >>> w = view_weights({"global": 0.4, "patch": 1.2, "texture": 1.4}, ["global", "patch"])  # texture off
        >>> {name: round(v, 3) for name, v in w.items()}
        {'global': 0.5, 'patch': 1.5}
        >>> w = view_weights({"global": 0.4, "patch": 1.2, "texture": 1.4}, ["global", "patch", "texture"], 2.0)
        >>> {name: round(v, 3) for name, v in w.items()}   # squared: 0.16, 1.44, 1.96; global floored, all scaled
        {'global': 0.241, 'patch': 1.169, 'texture': 1.591}
        >>> view_weights(None, ["global"])
        {'global': 1.0}
    """
    values = [max(float((separations or {}).get(name, 0.0)), 0.0) ** power for name in present]
    mean = sum(values) / len(values) if values else 0.0
    if mean <= 0.0 or not separations or any(name not in separations for name in present):
        return {name: 1.0 for name in present}
    floored = [max(v / mean, MIN_VOTE) for v in values]
    scale = len(floored) / sum(floored)
    return {name: w * scale for name, w in zip(present, floored)}


def fuse(
    recon_scores: np.ndarray,
    recon_maps: np.ndarray,
    head_maps: np.ndarray | None,
    fusion: str,
    stats: dict[str, list[float]],
    global_scores: np.ndarray | None = None,
    patch_scores: np.ndarray | None = None,
    network_weight: float = 1.0,
    texture_scores: np.ndarray | None = None,
    weigh_views: bool = True,
    place_maps: dict[str, np.ndarray] | None = None,
    separation_power: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and pixel maps from the parts: ``(scores (N,), maps (N, H, W))``.

    Each part is first standardised by its mean and spread on normal hold-out images (``stats``:
    ``{"recon": [mean, std], "head": [mean, std], "global": [...], "patch": [...], "texture": [...]}``):
    the reconstruction score, the head's score (the maximum of its smoothed map), the residual of
    :class:`GlobalView`, the worst window distance of :class:`PatchView` and the worst texture distance
    of :class:`TextureView` (these three are image scores only; the pixel map comes from the
    reconstruction and head maps).

    ``views`` (the default) gives each view of the image one vote: the network's two readings of one
    reconstruction (its error and the head that compares image and reconstruction) are averaged, then the
    whole-image, patch and texture scores are added, each part with the weight :func:`view_weights` gives
    it from ``stats["separation"]`` raised to ``separation_power`` (how well it told simulated defects from the hold-out normals when the
    model was fitted: see :meth:`~cellscan.core.bundle.CellscanModel.fit_stats`). Without separations, with
    ``weigh_views`` False, or in a model saved before the network was measured (no ``"network"`` entry),
    the network's vote is ``network_weight`` (0.5 in ``params.yaml``: on every real set measured, the
    network's image score is the weakest part) and the image views get the separations' weights or one vote
    each. The map is built the same way: the network's averaged maps with its weight,
    plus each place view's map (``place_maps``: ``{"patch": (N, h, w), "texture": ...}``, from
    :meth:`_PlaceView.place_maps`, brought to the maps' size) standardised like its score and weighted
    like it; without place maps, the network's averaged maps. ``sum`` adds all parts (models trained before ``views``
    keep it, so their thresholds stay valid). ``head`` or ``recon`` use one part alone. A part without
    statistics is left out; with none, the reconstruction part is used as it is.

    Example:
        >>> r, h = np.array([1.0, 3.0]), np.zeros((2, 2, 2)); h[1, 0, 0] = 0.9
        >>> st = {"recon": [1.0, 1.0], "head": [0.0, 0.1]}
        >>> s, _ = fuse(r, np.zeros((2, 2, 2)), h, "sum", st)
        >>> [round(float(v), 6) for v in s]   # (r - 1) / 1 + (max h - 0) / 0.1
        [0.0, 11.0]
        >>> g = np.array([2.0, 3.0])
        >>> s, _ = fuse(r, np.zeros((2, 2, 2)), h, "views", st | {"global": [2.0, 0.5]}, global_scores=g)
        >>> [round(float(v), 6) for v in s]   # ((r - 1) / 1 + (max h - 0) / 0.1) / 2 + (g - 2) / 0.5
        [0.0, 7.5]
        >>> s, _ = fuse(r, np.zeros((2, 2, 2)), h, "views", st | {"global": [2.0, 0.5]}, g, None, 0.5)
        >>> [round(float(v), 6) for v in s]   # half the network's vote: 0.5 * 5.5 + 2
        [0.0, 4.75]
        >>> st |= {"global": [2.0, 0.5], "patch": [0.0, 1.0], "separation": {"global": 0.5, "patch": 1.5}}
        >>> s, _ = fuse(r, np.zeros((2, 2, 2)), h, "views", st, g, np.array([0.0, 3.0]), 0.5)
        >>> [round(float(v), 6) for v in s]   # 0.5 * 5.5 + 0.5 * 2 + 1.5 * 3
        [0.0, 8.25]
        >>> st["separation"]["network"] = 1.0   # measured too: 1.0 / mean(0.5, 1.5, 1.0) of a vote
        >>> s, _ = fuse(r, np.zeros((2, 2, 2)), h, "views", st, g, np.array([0.0, 3.0]), 0.5)
        >>> [round(float(v), 6) for v in s]   # 1.0 * 5.5 + 0.5 * 2 + 1.5 * 3
        [0.0, 11.0]
    """
    head_scores = None if head_maps is None else head_maps.reshape(len(head_maps), -1).max(axis=1)
    if fusion == "head" and head_maps is not None:
        return head_scores, head_maps  # type: ignore[return-value]
    if fusion not in ("views", "sum") or "recon" not in stats:
        return recon_scores, recon_maps
    use_head = head_maps is not None and "head" in stats
    use_global = global_scores is not None and "global" in stats
    use_patch = patch_scores is not None and "patch" in stats
    use_texture = texture_scores is not None and "texture" in stats
    if not (use_head or use_global or use_patch or use_texture):
        return recon_scores, recon_maps
    mr, sr = stats["recon"]
    scores = (recon_scores - mr) / sr
    maps = (recon_maps - mr) / sr
    if use_head:
        mh, sh = stats["head"]
        scores = scores + (head_scores - mh) / sh
        maps = maps + (head_maps - mh) / sh
        if fusion == "views":  # one vote for the network's two readings
            scores, maps = scores / 2, maps / 2
    parts = {name: part for name, part in zip(VIEWS, (global_scores, patch_scores, texture_scores))
             if part is not None and name in stats}
    weigh = fusion == "views" and weigh_views
    separations: dict[str, float] | None = stats.get("separation") if weigh else None  # type: ignore[assignment]
    measured = "network" in (separations or {}) and bool(parts)  # models saved before keep network_weight
    weights = view_weights(separations, list(parts) + (["network"] if measured else []), separation_power)
    places = {name: grid for name, grid in (place_maps or {}).items() if name in parts} if fusion == "views" else {}
    if fusion == "views":
        network_weight = weights.get("network", network_weight)
        scores = network_weight * scores
        if places:
            maps = network_weight * maps
    for name, part in parts.items():
        m, sd = stats[name]
        scores = scores + weights[name] * (part - m) / sd
        if name in places:
            maps = maps + weights[name] * (_to_size(places[name], maps.shape[1:3]) - m) / sd
    return scores.astype(np.float32), maps.astype(np.float32)


def _to_size(grids: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Place maps (N, h, w) brought to (N, H, W) by linear interpolation (corners to corners)."""
    if grids.shape[1:3] == tuple(shape):
        return grids
    out = np.empty((len(grids), *shape), np.float32)
    for i, g in enumerate(grids):
        z = ndimage.zoom(g, (shape[0] / g.shape[0], shape[1] / g.shape[1]), order=1, mode="nearest",
                         grid_mode=False)
        out[i] = np.pad(z, ((0, max(0, shape[0] - z.shape[0])), (0, max(0, shape[1] - z.shape[1]))),
                        mode="edge")[: shape[0], : shape[1]]
    return out


def aggregate(maps: np.ndarray, how: str = "topk_mean", topk: float = 0.02) -> np.ndarray:
    """Image scores (N,) from maps (N, H, W).

    Example:
        >>> import numpy as np
        >>> m = np.zeros((1, 10, 10)); m[0, 0, :2] = 1.0   # 2 hot pixels of 100
        >>> [float(aggregate(m, h, 0.02)[0]) for h in ("mean", "max", "topk_mean")]
        [0.02, 1.0, 1.0]
    """
    flat = maps.reshape(len(maps), -1)
    if how == "mean":
        return flat.mean(axis=1)
    if how == "max":
        return flat.max(axis=1)
    if how == "topk_mean":
        k = max(1, int(round(flat.shape[1] * topk)))
        return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)
    msg = f"unknown aggregation {how!r}; expected mean, max or topk_mean"
    raise ConfigError(msg)


def quantile_threshold(normal_scores: np.ndarray, q: float) -> float:
    """Threshold at the ``q`` quantile of normal scores.

    Example:
        >>> quantile_threshold(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 0.5)   # standard case: the median
        3.0
    """
    if len(normal_scores) == 0:
        msg = "cannot calibrate a threshold without normal scores"
        raise ConfigError(msg)
    return float(np.quantile(normal_scores, q))


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises F1 (``score > threshold`` is an anomaly).

    Candidates lie midway between consecutive distinct scores, so the threshold separates
    rather than sits on a training score.

    Example:
        >>> f1_threshold(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1]))  # clean split
        0.55
    """
    order = np.unique(scores)
    cands = (order[:-1] + order[1:]) / 2 if len(order) > 1 else order
    best_t, best_f1 = float(cands[0]), -1.0
    pos = labels.astype(bool)
    for t in cands:
        pred = scores > t
        tp = np.sum(pred & pos)
        f1 = 2 * tp / (pred.sum() + pos.sum()) if (pred.sum() + pos.sum()) else 0.0
        if f1 > best_f1:
            best_t, best_f1 = float(t), float(f1)
    return round(best_t, 12)


def calibrate_threshold(normal_scores: np.ndarray, anomaly_scores: np.ndarray | None, quantile: float) -> float:
    """F1-optimal threshold where known anomalies exist, else the ``quantile`` of the normal scores.

    Where the F1-optimal threshold catches no known anomaly or flags every normal (the anomalies score
    below the normals), the quantile of the normals again: such a threshold would flag every scan.

    Example:
        >>> calibrate_threshold(np.array([0.5, 0.6, 0.7, 0.8]), np.array([0.1]), 0.75)  # not 0.3
        0.725
    """
    if anomaly_scores is None or len(anomaly_scores) == 0:
        return quantile_threshold(normal_scores, quantile)
    scores = np.concatenate([normal_scores, anomaly_scores])
    labels = np.concatenate([np.zeros(len(normal_scores)), np.ones(len(anomaly_scores))])
    t = f1_threshold(scores, labels)
    if not np.any(np.asarray(anomaly_scores) > t) or np.all(np.asarray(normal_scores) > t):
        return quantile_threshold(normal_scores, quantile)
    return t
