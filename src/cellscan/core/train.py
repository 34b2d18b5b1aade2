"""Fit the autoencoder on normal images, standardise its maps and calibrate its threshold."""

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
from cellscan.core.bundle import CellscanModel
from cellscan.core.augment import augment, simulate_anomaly
from cellscan.core.config import Params
from cellscan.core.data import Dataset, load_dataset
from cellscan.core.evaluate import Evaluation, evaluate_model
from cellscan.core.images import load_batch

logger = logging.getLogger(__name__)


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and Keras/TensorFlow."""
    import keras

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def _batches(images: np.ndarray, params: Params, seed: int) -> Any:
    import keras

    tp = params.train

    class Batches(keras.utils.PyDataset):  # type: ignore[misc]
        """Augmented, partly corrupted inputs with clean targets; reshuffled each epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(images))

        def __len__(self) -> int:
            return math.ceil(len(images) / tp.batch_size)

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            idx = self.order[i * tp.batch_size : (i + 1) * tp.batch_size]
            clean = np.stack([augment(images[j], self.rng, tp.flip) if tp.augment else images[j] for j in idx])
            noisy = clean.copy()
            for k in range(len(noisy)):
                if self.rng.random() < tp.anomaly_prob:
                    noisy[k], _ = simulate_anomaly(clean[k], self.rng, images)
            return noisy, clean

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(len(images))

    return Batches()


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
    """Fit an autoencoder on the dataset's training normals (no threshold yet).

    Args:
        params: all parameter groups.
        dataset: the resolved dataset.
        callbacks: extra Keras callbacks (MLflow logging, progress).
        init_from: fine-tune from this model's weights instead of starting afresh.
        verbose: Keras verbosity.
    """
    import keras

    from cellscan.core.losses import ReconstructionLoss
    from cellscan.core.model import build_autoencoder

    set_seeds(params.base.seed)
    d = params.data
    fit_paths, hold_paths = dataset.split_train(d.val_fraction, params.base.seed)
    x_fit = load_batch(fit_paths, size=d.image_size, channels=d.channels, max_pixels=d.max_pixels)
    x_hold = load_batch(hold_paths, size=d.image_size, channels=d.channels, max_pixels=d.max_pixels)

    net = build_autoencoder(d.image_size, d.channels, params.model)
    if init_from is not None:
        net.set_weights(init_from.keras_model.get_weights())
    net.compile(optimizer=keras.optimizers.Adam(params.train.learning_rate), loss=ReconstructionLoss(params.train.ssim_weight))
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=params.train.patience, restore_best_weights=True
    )
    hist = net.fit(
        _batches(x_fit, params, params.base.seed),
        validation_data=(x_hold, x_hold),
        epochs=params.train.epochs,
        callbacks=[stop, *(callbacks or [])],
        verbose=verbose,
    )
    meta = {
        "image_size": d.image_size,
        "channels": d.channels,
        "threshold": float("inf"),
        "score": asdict(params.score),
        "params": params.to_dict(),
        "cellscan_version": __version__,
        "n_train": len(fit_paths),
        "n_holdout": len(hold_paths),
    }
    model = CellscanModel(net, meta)
    model.fit_stats(x_hold)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
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
    dataset = data if isinstance(data, Dataset) else load_dataset(data or params.data.root)
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
