"""Fit the networks on normal images (random crops at the images' own scale), standardise their maps and
calibrate the threshold."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellscan import __version__
from cellscan.core.bundle import MODEL_FILE, CellscanModel, check_replaceable
from cellscan.core.augment import augment, random_crop, simulate_anomaly
from cellscan.core.config import Params
from cellscan.core.data import Dataset, load_dataset
from cellscan.core.evaluate import Evaluation, evaluate_model, require_validation
from cellscan.core.images import image_shape, load_batch

logger = logging.getLogger(__name__)
MIN_STEPS = 50  # batches per epoch at least, so that small sets still get a steady validation signal


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and Keras/TensorFlow."""
    import keras

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def working_shape(paths: list[Path], params: Params) -> tuple[int, int]:
    """The (height, width) every image is brought to: the training images' own size (their median),
    long side capped at ``data.max_side``, rounded up to what the networks' strides need.

    ``data.image_size`` > 0 forces a square size instead.
    """
    m = params.model.multiple
    if params.data.image_size:
        h = w = params.data.image_size
    else:
        sizes = np.array([image_shape(p) for p in paths[:: max(1, len(paths) // 200)]])
        h, w = (int(v) for v in np.median(sizes, axis=0))
        scale = min(1.0, params.data.max_side / max(h, w))
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    return -(-h // m) * m, -(-w // m) * m


def _crop_side(shape: tuple[int, int], params: Params) -> int:
    m = params.model.multiple
    return max(m, min(params.train.crop, *shape) // m * m)


def _corrupt(clean: np.ndarray, rng: np.random.Generator, prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Simulated anomalies in a share ``prob`` of a batch: (inputs, masks (N, H, W, 1))."""
    noisy = clean.copy()
    masks = np.zeros((*clean.shape[:3], 1), np.float32)
    for k in range(len(clean)):
        if rng.random() < prob:
            pool = np.delete(clean, k, axis=0) if len(clean) > 1 else clean
            noisy[k], m = simulate_anomaly(clean[k], rng, pool)
            masks[k, ..., 0] = m
    return noisy, masks


def _batches(images: np.ndarray, params: Params, seed: int, head: bool) -> Any:
    import keras

    tp = params.train
    side = _crop_side(images.shape[1:3], params)
    steps = tp.steps_per_epoch or max(MIN_STEPS, math.ceil(len(images) / tp.batch_size))

    class Batches(keras.utils.PyDataset):  # type: ignore[misc]
        """Augmented random crops, partly corrupted, with clean targets and anomaly masks."""

        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)

        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int) -> tuple[np.ndarray, Any]:
            idx = self.rng.integers(0, len(images), tp.batch_size)
            clean = np.stack([
                random_crop(augment(images[j], self.rng, tp.flip) if tp.augment else images[j], side, self.rng)
                for j in idx
            ])
            noisy, masks = _corrupt(clean, self.rng, tp.anomaly_prob)
            return noisy, ({"recon": clean, "mask": masks} if head else {"recon": clean})

    return Batches()


class _BestWithinBudget:
    """Keep the weights of the best validation loss; stop on patience or when the time budget is spent."""

    def __new__(cls, patience: int, max_seconds: float) -> Any:  # a keras Callback built lazily
        import keras

        class Callback(keras.callbacks.Callback):  # type: ignore[misc]
            def on_train_begin(self, logs: Any = None) -> None:
                self.t0, self.best, self.wait, self.weights = time.perf_counter(), math.inf, 0, None
                self.reason = "epochs"

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                loss = float((logs or {}).get("val_loss", math.inf))
                if loss < self.best:
                    self.best, self.wait, self.weights = loss, 0, self.model.get_weights()
                else:
                    self.wait += 1
                if self.wait >= patience:
                    self.model.stop_training, self.reason = True, "patience"
                elif time.perf_counter() - self.t0 > max_seconds:
                    self.model.stop_training, self.reason = True, "time budget"

            def on_train_end(self, logs: Any = None) -> None:
                if self.weights is not None:
                    self.model.set_weights(self.weights)

        return Callback()


@dataclass
class TrainResult:
    model: CellscanModel
    history: dict[str, list[float]]
    evaluation: Evaluation
    seconds: float
    epochs: int

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "train_seconds": round(self.seconds, 1)} | self.evaluation.metrics


def fit_model(
    params: Params,
    dataset: Dataset,
    *,
    callbacks: list[Any] | None = None,
    init_from: CellscanModel | None = None,
    verbose: int = 0,
) -> tuple[CellscanModel, dict[str, list[float]]]:
    """Fit the networks on the dataset's training normals (no threshold yet).

    Args:
        params: all parameter groups.
        dataset: the resolved dataset.
        callbacks: extra Keras callbacks (MLflow logging, progress).
        init_from: fine-tune from this model's weights (and keep its working size) instead of starting afresh.
        verbose: Keras verbosity.
    """
    import keras

    from cellscan.core.losses import ReconstructionLoss
    from cellscan.core.model import build_network

    set_seeds(params.base.seed)
    d, tp = params.data, params.train
    fit_paths, hold_paths = dataset.split_train(d.val_fraction, params.base.seed)
    shape = init_from.shape if init_from is not None else working_shape(dataset.train, params)
    x_fit = load_batch(fit_paths, size=shape, channels=d.channels, max_pixels=d.max_pixels)
    x_hold = load_batch(hold_paths, size=shape, channels=d.channels, max_pixels=d.max_pixels)

    net = build_network(d.channels, params.model)
    head = "mask" in net.output
    if init_from is not None:
        net.set_weights(init_from.keras_model.get_weights())
    losses: dict[str, Any] = {"recon": ReconstructionLoss(tp.ssim_weight)}
    if head:
        losses["mask"] = keras.losses.BinaryFocalCrossentropy(gamma=2.0, from_logits=True)
    net.compile(optimizer=keras.optimizers.Adam(tp.learning_rate), loss=losses,
                loss_weights={"recon": 1.0, "mask": tp.head_weight} if head else None)
    # Validation on fixed crops of the hold-out (full images would cost as much as the training epoch).
    vrng = np.random.default_rng(params.base.seed + 1)
    side = _crop_side(shape, params)
    n_val = int(np.clip(4 * len(x_hold), 64, 256))
    hold_crops = np.stack([random_crop(x_hold[i % len(x_hold)], side, vrng) for i in range(n_val)])
    hold_in, hold_masks = _corrupt(hold_crops, vrng, tp.anomaly_prob)
    hold_y = {"recon": hold_crops, "mask": hold_masks} if head else {"recon": hold_crops}
    budget = _BestWithinBudget(tp.patience, tp.max_seconds)
    t0 = time.perf_counter()
    hist = net.fit(
        _batches(x_fit, params, params.base.seed, head),
        validation_data=(hold_in, hold_y),
        validation_batch_size=tp.batch_size,
        epochs=tp.epochs,
        callbacks=[budget, *(callbacks or [])],
        verbose=verbose,
    )
    seconds = time.perf_counter() - t0
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    crops = len(history.get("loss", [])) * len(_batches(x_fit, params, 0, head)) * tp.batch_size
    meta = {
        "image_size": max(shape),
        "input_shape": list(shape),
        "multiple": params.model.multiple,
        "channels": d.channels,
        "threshold": float("inf"),
        "score": asdict(params.score),
        "params": params.to_dict(),
        "cellscan_version": __version__,
        "n_train": len(fit_paths),
        "n_holdout": len(hold_paths),
        "n_params": int(net.count_params()),
        "train_crop": _crop_side(shape, params),
        "train_images_per_s": round(crops / max(seconds, 1e-9), 2),
        "stopped_by": budget.reason,
    }
    model = CellscanModel(net, meta)
    model.fit_global(x_fit)
    model.fit_stats(x_hold)
    logger.info("fitted %d parameters on %s crops of %s images at %.1f crops/s (%s)", meta["n_params"],
                meta["train_crop"], shape, meta["train_images_per_s"], budget.reason)
    return model, history


def train(
    params: Params,
    data: str | Path | Dataset | None = None,
    out_dir: str | Path | None = None,
    *,
    callbacks: list[Any] | None = None,
    init_from: CellscanModel | None = None,
    verbose: int = 0,
) -> TrainResult:
    """Train, calibrate the threshold on validation (+ known anomalies) and optionally save.

    Args:
        params: all parameter groups.
        data: dataset folder or resolved dataset; default ``params.data.root``.
        out_dir: write the model directory here when given.
        callbacks: extra Keras callbacks.
        init_from: fine-tune from this model's weights.
        verbose: Keras verbosity.
    """
    if out_dir is not None:  # before minutes of training, not after
        check_replaceable(out_dir, (MODEL_FILE,), "model directory")
    dataset = data if isinstance(data, Dataset) else load_dataset(data or params.data.root)
    require_validation(dataset)  # before minutes of training, not after
    t0 = time.perf_counter()
    model, history = fit_model(params, dataset, callbacks=callbacks, init_from=init_from, verbose=verbose)
    seconds = time.perf_counter() - t0
    evaluation = evaluate_model(model, dataset, calibrate=True, max_pixels=params.data.max_pixels)
    model = model.with_threshold(evaluation.threshold, metrics=evaluation.metrics, train_seconds=round(seconds, 2))
    if out_dir is not None:
        model.save(out_dir)
    epochs = len(history.get("loss", []))
    logger.info("trained %d epochs in %.1fs: %s", epochs, seconds, evaluation.metrics)
    return TrainResult(model, history, evaluation, seconds, epochs)
