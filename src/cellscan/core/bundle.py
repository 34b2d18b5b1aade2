"""The model bundle: one directory holding the networks and everything needed to score.

Layout::

    <dir>/model.keras      the reconstruction network and the discriminative head (one Keras graph)
    <dir>/meta.json        working size, channels, threshold, score params, fusion statistics, params, version
    <dir>/map_stats.npz    per-pixel mean/spread of normal error maps (the map's standardisation)
    <dir>/global_view.npz  the whole-image view's mean and principal components (absent in older models)
    <dir>/patch_view.npz   the window bank of normal images and each place's normal distances (absent in
                           older models and for small images)
    <dir>/texture_view.npz the texture bank of normal images and each place's normal distances (likewise)

Saving writes to a sibling temporary folder and renames it into place, so a crash never leaves a
half-written model where a complete one was.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cellscan import __version__
from cellscan.core.config import ScoreParams
from cellscan.errors import CellscanError, ImageError, ModelError
from cellscan.files import swap_in
from cellscan.core.images import decode_image, load_image, resize
from cellscan.core.augment import simulate_ct_defect, simulate_warp
from cellscan.core.scoring import (VIEWS, GlobalView, MapStats, PatchView, TextureView, aggregate,
                                   anomaly_maps, fuse, maps_key, place_scores, raw_maps, separation, smooth)

logger = logging.getLogger(__name__)

MODEL_FILE, META_FILE, STATS_FILE, GLOBAL_FILE = "model.keras", "meta.json", "map_stats.npz", "global_view.npz"
PATCH_FILE, TEXTURE_FILE = "patch_view.npz", "texture_view.npz"
ForwardFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


class MapsFn(Protocol):
    """(x, recon, head prob or None) -> (map, head map or None), built for the score parameters ``key``."""

    key: dict[str, Any]

    def __call__(self, x: np.ndarray, recon: np.ndarray,
                 prob: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]: ...


def _mean_std(v: np.ndarray) -> list[float]:
    return [float(np.mean(v)), max(float(np.std(v)), 1e-6)]


def _simulated_defects(holdout: np.ndarray, per_image: int = 2, least: int = 64, chunk: int = 32,
                       seed: int = 0, simulate: Callable[..., tuple[np.ndarray, np.ndarray]] = simulate_ct_defect,
                       ) -> Iterator[np.ndarray]:
    """Defects simulated on copies of the hold-out images (by default CT-like: voids, particles, cracks,
    shifted bands, faint smudges; ``simulate_warp`` for local deformations): ``per_image`` each, at least
    ``least`` in all; yielded ``chunk`` images at a time (the same every call)."""
    rng = np.random.default_rng(seed)
    n = max(per_image * len(holdout), least)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        yield np.stack([simulate(holdout[i % len(holdout)], rng)[0] for i in range(start, stop)])


@dataclass
class ScoreResult:
    """Scores of a batch: one entry per image."""

    scores: np.ndarray  # (N,) anomaly_score: what the threshold applies to
    recon_scores: np.ndarray  # (N,) reconstruction_error
    maps: np.ndarray  # (N, H, W) pixel anomaly map (the fused map)
    recon: np.ndarray  # (N, H, W, C)
    threshold: float

    @property
    def is_anomaly(self) -> np.ndarray:
        return self.scores.astype(np.float64) > float(self.threshold)  # as record(): in float64

    def record(self, i: int) -> dict[str, Any]:
        """The per-image answer: ``is_anomaly``, ``anomaly_score``, ``reconstruction_error`` and ``threshold``."""
        return {
            # In float64, as whoever reads the answer compares (NumPy 2 would compare a float32 score in float32)
            "is_anomaly": float(self.scores[i]) > float(self.threshold),
            "anomaly_score": float(self.scores[i]),
            "reconstruction_error": float(self.recon_scores[i]),
            "threshold": float(self.threshold),
        }


def _read_arrays(path: Path, kind: Any) -> Any:
    """One of a bundle's ``.npz`` parts as ``kind``, None where the bundle has none (saved before it)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:  # allow_pickle stays False: a bundle never runs code it loads
            return kind.from_arrays({k: z[k] for k in z.files})
    except Exception as exc:  # noqa: BLE001 (numpy and zipfile raise many types for a damaged file)
        msg = f"cannot read {path} ({type(exc).__name__}: {str(exc)[:120]}); retrain or restore the model"
        raise ModelError(msg) from None


def staging_dir(target: Path, what: str, error: type[CellscanError] = ModelError) -> Path:
    """A new empty sibling of ``target`` (0755: mkdtemp's 0700 would hide it from the service's user) to write
    ``what`` into before it is renamed into place; ``error`` names a folder that cannot be made."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        tmp.chmod(0o755)
    except OSError as exc:
        msg = f"cannot write the {what} {target}: {exc.strerror or exc}"
        raise error(msg) from None
    return tmp


MIN_IMAGE_SIDE = 8  # the smallest image side scored (or the model's working side where that is smaller)


def check_replaceable(directory: str | Path, markers: Sequence[str], what: str) -> Path:
    """``directory`` resolved, where writing ``what`` there loses nothing: it does not exist, or is an empty
    folder, or holds an earlier ``what`` (one of ``markers``). A file, or a folder of something else (a
    dataset, notes, a model where an export goes), is refused before any work is done.

    Raises:
        ModelError: naming the path and a few of the files that would have been lost.
    """
    directory = Path(directory).resolve()
    if not directory.exists():
        return directory
    if not directory.is_dir():
        msg = f"{directory} is a file, not a folder; expected a path for the {what} (a new or earlier {what} folder)"
        raise ModelError(msg)
    held = sorted(f.name for f in directory.iterdir() if f.name not in (".gitkeep", ".DS_Store"))  # no loss
    if held and not any((directory / m).is_file() for m in markers):
        msg = (f"{directory} holds other files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) and no "
               f"{what}; refusing to replace it: choose a new path or an earlier {what} folder")
        raise ModelError(msg)
    return directory


class CellscanModel:
    """The networks with their working size, threshold, score configuration and map statistics."""

    def __init__(self, keras_model: Any, meta: dict[str, Any], stats: MapStats | None = None,
                 global_view: GlobalView | None = None, patch_view: PatchView | None = None,
                 texture_view: TextureView | None = None) -> None:
        self.keras_model = keras_model
        self.meta = meta
        self.stats = stats
        self.global_view = global_view
        self.patch_view = patch_view
        self.texture_view = texture_view
        self._forward: ForwardFn | None = None
        self._maps: MapsFn | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """The working (height, width) every image is resized to before scoring."""
        h, w = self.meta.get("input_shape") or (self.meta["image_size"], self.meta["image_size"])
        return int(h), int(w)

    @property
    def image_size(self) -> int:
        """The working size's long side."""
        return max(self.shape)

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def score_params(self) -> ScoreParams:
        # bundles saved before the network's weight existed gave it a full vote, before the power each part
        # its separation
        return ScoreParams(**({"network_weight": 1.0, "separation_power": 1.0} | self.meta["score"]))

    @property
    def has_head(self) -> bool:
        return "mask" in self.keras_model.output

    def with_threshold(self, threshold: float, **extra: Any) -> CellscanModel:
        """A copy whose metadata carries a new threshold (and any extra metadata)."""
        meta = json.loads(json.dumps(self.meta)) | extra
        meta["threshold"] = float(threshold)
        return self._with_meta(meta)

    def with_score_params(self, p: ScoreParams) -> CellscanModel:
        meta = json.loads(json.dumps(self.meta))
        meta["score"] = asdict(p)
        return self._with_meta(meta)

    def _with_meta(self, meta: dict[str, Any]) -> CellscanModel:
        return CellscanModel(self.keras_model, meta, self.stats, self.global_view, self.patch_view, self.texture_view)

    def use_backend(self, fn: ForwardFn) -> None:
        """Run the networks with another runtime (ONNX, TFLite) instead of Keras: x -> (recon, mask logits or None)."""
        self._forward = fn

    def use_maps(self, fn: MapsFn) -> None:
        """Compute the maps with another runtime: (x, recon, head prob) -> (map, head map or None).

        ``fn.key`` names the score parameters it was built for (map, normalize, smooth_sigma,
        head_sigma); scoring with other parameters uses numpy.
        """
        self._maps = fn

    # -- scoring ----------------------------------------------------------------------------
    def forward(self, x: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
        """Both networks on (N, H, W, C): (reconstruction, head probability (N, H, W) or None)."""
        if self._forward is not None:
            recon, logits = self._forward(x)
        else:
            m = int(self.meta.get("multiple", 8))
            h, w = x.shape[1:3]
            ph, pw = -h % m, -w % m
            xp = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else x
            recons, heads = [], []
            # predict_on_batch runs the compiled graph: much faster than an eager call for one image.
            for i in range(0, len(xp), batch_size):
                out = self.keras_model.predict_on_batch(xp[i : i + batch_size])
                recons.append(np.asarray(out["recon"])[:, :h, :w])
                if "mask" in out:
                    heads.append(np.asarray(out["mask"])[:, :h, :w, 0])
            recon = np.concatenate(recons) if recons else np.zeros_like(x)
            logits = np.concatenate(heads) if heads else None
        prob = None if logits is None else (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)
        return recon.astype(np.float32), prob

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0]

    def check_batch(self, x: np.ndarray) -> None:
        want = (*self.shape, self.channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            msg = f"expected a batch of shape (N, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}"
            raise ImageError(msg)

    def _parts(self, x: np.ndarray, p: ScoreParams) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(reconstruction, reconstruction map, smoothed head map or None)."""
        recon, prob = self.forward(x)
        key = self._maps.key if self._maps is not None else None
        if key is not None and key == maps_key(p):
            rmap, hmap = self._maps(x, recon, prob)  # type: ignore[misc]
            if (hmap is None) == (prob is None):
                return recon, rmap, hmap
        rmap = anomaly_maps(x, recon, p, self.stats)
        hmap = None if prob is None else smooth(prob, p.head_sigma)
        return recon, rmap, hmap

    def score_arrays(self, x: np.ndarray, p: ScoreParams | None = None, chunk: int = 64) -> ScoreResult:
        """Score preprocessed images (N, H, W, C) in [0, 1] at the working size."""
        self.check_batch(x)
        p = p or self.score_params
        fusion = self.meta.get("fusion") or {}
        parts = [self._parts(x[i : i + chunk], p) for i in range(0, len(x), chunk)] or [
            (np.zeros_like(x), np.zeros(x.shape[:3], np.float32), None)]
        recon = np.concatenate([r for r, _, _ in parts])
        rmap = np.concatenate([m for _, m, _ in parts])
        hmap = None if parts[0][2] is None else np.concatenate([h for _, _, h in parts])
        rscore = aggregate(rmap, p.aggregation, p.topk)
        gscore = self.global_view.scores(x) if self.global_view is not None and p.global_side else None
        places = {name: view.place_maps(x) for name, view, side in (("patch", self.patch_view, p.patch_side),
                                                                    ("texture", self.texture_view, p.texture_side))
                  if view is not None and side}
        pscore = place_scores(places["patch"]) if "patch" in places else None
        tscore = place_scores(places["texture"]) if "texture" in places else None
        scores, maps = fuse(rscore, rmap, hmap, p.fusion, fusion, gscore, pscore, p.network_weight, tscore,
                            p.view_weights == "simulated", places, p.separation_power)
        return ScoreResult(scores, rscore, maps, recon, self.threshold)

    def load(self, source: str | Path | bytes, max_pixels: int = 50_000_000) -> np.ndarray:
        """Load one image the way this model expects it: (H, W, C) at the working size."""
        return self.load_pair(source, max_pixels)[0]

    def load_pair(self, source: str | Path | bytes, max_pixels: int = 50_000_000,
                  name: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """One decode, two arrays: (the working-size input, the image at its own size for heatmaps); ``name``
        names encoded bytes in error messages."""
        if isinstance(source, bytes | bytearray):
            native = decode_image(bytes(source), channels=self.channels, max_pixels=max_pixels, name=name)
        else:
            native = load_image(source, channels=self.channels, max_pixels=max_pixels)
            name = str(source)
        least = min(MIN_IMAGE_SIDE, *self.shape)
        if min(native.shape[:2]) < least:  # a 1x1 or 3x5 "image" holds nothing to judge a scan by
            msg = (f"{name}: image is {native.shape[1]}x{native.shape[0]} pixels; expected at least {least} on "
                   f"each side (this model works at {self.shape[1]}x{self.shape[0]})")
            raise ImageError(msg)
        return resize(native, self.shape), native

    def score_images(self, sources: Sequence[str | Path | bytes]) -> ScoreResult:
        """Load and score image files or encoded bytes."""
        x = np.stack([self.load(s) for s in sources]) if sources else np.zeros((0, *self.shape, self.channels),
                                                                                 np.float32)
        return self.score_arrays(x)

    def fit_global(self, normals: np.ndarray) -> None:
        """Fit the whole-image, patch and texture views on normal images (the training images).

        None when ``global_side`` / ``patch_side`` / ``texture_side`` is 0; no patch or texture view for
        working sizes under ``PatchView.MIN_SIDE``. The patch and texture views work at ``patch_side`` /
        ``texture_side`` pixels on the long side, or at ``view_scale`` of the working long side where that
        is more (:meth:`~cellscan.core.config.ScoreParams.view_side`).
        """
        p = self.score_params
        use_global = p.global_side and len(normals) > 1
        self.global_view = GlobalView.fit(normals, p.global_side) if use_global else None
        shape = normals.shape[1:3]
        patch_side, texture_side = p.view_side(p.patch_side, shape), p.view_side(p.texture_side, shape)
        use_patch = patch_side and len(normals) > 1 and PatchView.usable(shape, patch_side)
        self.patch_view = PatchView.fit(normals, patch_side) if use_patch else None
        use_texture = texture_side and len(normals) > 1 and TextureView.usable(shape, texture_side)
        self.texture_view = TextureView.fit(normals, texture_side) if use_texture else None

    def fit_stats(self, holdout: np.ndarray) -> None:
        """Standardise maps and scores by what normal hold-out images (not seen in fitting) show.

        With two or more image views, the separation (:func:`~cellscan.core.scoring.separation`) of
        simulated defects from the hold-out images themselves is kept too, and the ``views`` fusion weighs
        its parts by it. Two families are simulated on the hold-out images: CT-like defects (voids,
        particles, cracks, shifted bands, faint smudges) and local deformations
        (:func:`~cellscan.core.augment.simulate_warp`).
        An image view, which never learns from defects, is measured on both (the mean of the two
        separations). The network is measured on the deformations alone: its head is trained on CT-like
        defects, so on those it would always look best, while no network ever sees a deformation. Both
        families' separations are kept (``separation_by_family``) for the record.
        """
        p = self.score_params
        recon, prob = self.forward(holdout)
        self.stats = MapStats.fit(raw_maps(holdout, recon, "l2_ssim"))
        fusion: dict[str, Any] = {}

        def network(x: np.ndarray, recon: np.ndarray, prob: np.ndarray | None) -> dict[str, np.ndarray]:
            rmap = anomaly_maps(x, recon, p, self.stats)
            out = {"recon": aggregate(rmap, p.aggregation, p.topk)}
            if prob is not None:
                out["head"] = smooth(prob, p.head_sigma).reshape(len(prob), -1).max(axis=1)
            return out

        net = network(holdout, recon, prob)
        fusion |= {name: _mean_std(s) for name, s in net.items()}
        views = {name: view for name, view in zip(VIEWS, (self.global_view, self.patch_view, self.texture_view))
                 if view is not None}
        normal = {name: view.scores(holdout) for name, view in views.items()}
        fusion |= {name: _mean_std(s) for name, s in normal.items()}
        if len(views) > 1 and len(holdout):

            def network_vote(parts: dict[str, np.ndarray]) -> np.ndarray:  # as :func:`fuse` reads the network
                z = [(parts[name] - fusion[name][0]) / fusion[name][1] for name in parts]
                return sum(z) / len(z)

            normal["network"] = network_vote(net)
            by_family: dict[str, dict[str, float]] = {}
            for family, simulate in (("ct", simulate_ct_defect), ("warp", simulate_warp)):
                found: dict[str, list[np.ndarray]] = {name: [] for name in normal}
                for defects in _simulated_defects(holdout, simulate=simulate):
                    for name, view in views.items():
                        found[name].append(view.scores(defects))
                    if family == "warp":
                        found["network"].append(network_vote(network(defects, *self.forward(defects))))
                by_family[family] = {name: round(separation(normal[name], np.concatenate(parts)), 4)
                                     for name, parts in found.items() if parts}
            fusion["separation"] = {name: round((by_family["ct"][name] + by_family["warp"][name]) / 2, 4)
                                    for name in views} | {"network": by_family["warp"]["network"]}
            fusion["separation_by_family"] = by_family
        self.meta["fusion"] = fusion

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the model directory atomically (temporary sibling, then rename); it may replace an earlier
        model directory, never a file or a folder of anything else (:func:`check_replaceable`)."""
        directory = check_replaceable(directory, (MODEL_FILE,), "model directory")  # an export has meta.json too
        tmp = staging_dir(directory, "model directory")
        try:
            self.keras_model.save(tmp / MODEL_FILE)
            meta = self.meta | {"cellscan_version": __version__}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if self.stats is not None:
                np.savez(tmp / STATS_FILE, **self.stats.to_arrays())
            if self.global_view is not None:
                np.savez(tmp / GLOBAL_FILE, **self.global_view.to_arrays())
            if self.patch_view is not None:
                np.savez(tmp / PATCH_FILE, **self.patch_view.to_arrays())
            if self.texture_view is not None:
                np.savez(tmp / TEXTURE_FILE, **self.texture_view.to_arrays())
            swap_in(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load_dir(cls, directory: str | Path, network: bool = True) -> CellscanModel:
        """Load a model directory written by :meth:`save`.

        Args:
            directory: the model directory.
            network: load model.keras; False reads only the scoring files (no Keras import), for a
                model whose networks run elsewhere (:meth:`use_backend`, ``cellscan.edge``).

        Raises:
            ModelError: the directory or one of its files is missing or unreadable.
        """
        directory = Path(directory)
        if not directory.is_dir():
            msg = (f"model directory does not exist: {directory}" if not directory.exists()
                   else f"{directory} is a file; expected a model directory (model.keras, meta.json, ...)")
            raise ModelError(msg)
        for name in (MODEL_FILE, META_FILE) if network else (META_FILE,):
            if not (directory / name).is_file():
                msg = f"not a cellscan model directory (missing {name}): {directory}"
                raise ModelError(msg)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            model = None
            if network:
                import keras

                import cellscan.core.model  # noqa: F401  (registers the custom layers the graph names)

                model = keras.models.load_model(directory / MODEL_FILE, compile=False)
        except Exception as exc:  # keras raises many types for a corrupt file
            msg = f"cannot load model from {directory}: {exc}"
            raise ModelError(msg) from exc
        missing = [k for k in ("channels", "threshold", "score") if k not in meta] if isinstance(meta, dict) else []
        if not isinstance(meta, dict) or missing or not ("input_shape" in meta or "image_size" in meta):
            what = f"missing {', '.join(missing) or 'input_shape'}" if isinstance(meta, dict) else "not an object"
            msg = f"{directory / META_FILE}: not a cellscan model's meta.json ({what}); retrain or restore the model"
            raise ModelError(msg)
        fusion = meta.get("fusion") if isinstance(meta.get("fusion"), dict) else {}
        parts = {"recon": STATS_FILE, "global": GLOBAL_FILE, "patch": PATCH_FILE, "texture": TEXTURE_FILE}
        gone = [name for part, name in parts.items() if part in fusion and not (directory / name).is_file()]
        if gone:  # scored without them, the threshold calibrated with them would mean something else
            msg = (f"{directory}: {', '.join(gone)} missing, though its meta.json was calibrated with "
                   f"{'it' if len(gone) == 1 else 'them'} (an incomplete copy?); copy the whole directory or "
                   "retrain")
            raise ModelError(msg)
        stats, view, patches, texture = (_read_arrays(directory / name, kind) for name, kind in (
            (STATS_FILE, MapStats), (GLOBAL_FILE, GlobalView), (PATCH_FILE, PatchView), (TEXTURE_FILE, TextureView)))
        return cls(model, meta, stats, view, patches, texture)

    def describe(self) -> dict[str, Any]:
        keep = ("input_shape", "channels", "threshold", "score", "metrics", "data_hash", "cellscan_version")
        return {k: self.meta[k] for k in keep if k in self.meta}

