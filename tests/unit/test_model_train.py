from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from cellscan.core.bundle import CellscanModel
from cellscan.core.augment import blob_mask, simulate_anomaly
from cellscan.core.config import ModelParams
from cellscan.errors import ConfigError, ImageError, ModelError
from cellscan.core.model import build_autoencoder


def test_autoencoder_shapes_and_range():
    net = build_autoencoder(32, 1, ModelParams(base_filters=4, depth=2, latent_dim=8))
    y = np.asarray(net(np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)))
    assert y.shape == (2, 32, 32, 1)
    assert 0.0 <= y.min() and y.max() <= 1.0
    rgb = build_autoencoder(16, 3, ModelParams(base_filters=4, depth=1, latent_dim=8))
    assert rgb.output_shape == (None, 16, 16, 3)


def test_size_must_divide_by_depth():
    with pytest.raises(ConfigError, match="divisible by 2\\*\\*model.depth = 8"):
        build_autoencoder(36, 1, ModelParams(depth=3))


def test_simulated_anomaly_changes_only_the_mask_region():
    rng = np.random.default_rng(0)
    x = np.full((32, 32, 1), 0.5, np.float32)
    changed = 0
    for _ in range(5):
        y, mask = simulate_anomaly(x, rng, np.stack([x, x]))
        assert mask.any() and mask.mean() < 0.5
        far = ~ndimage.binary_dilation(mask, iterations=3)  # beyond the soft edge of the blend
        assert np.allclose(y[..., 0][far], 0.5, atol=1e-3)
        changed += int(np.abs(y[..., 0][mask] - 0.5).mean() > 1e-3)
    assert changed >= 3
    assert blob_mask((16, 16), rng).shape == (16, 16)


def test_training_writes_a_complete_model(trained, model_dir):
    meta = json.loads((model_dir / "meta.json").read_text())
    assert {"image_size", "channels", "threshold", "score", "params", "cellscan_version", "metrics"} <= set(meta)
    assert np.isfinite(meta["threshold"])
    assert 0.0 <= trained.evaluation.metrics["image_auroc"] <= 1.0
    assert trained.epochs >= 1 and "val_loss" in trained.history


def test_saved_model_scores_like_the_trained_one(trained, model_dir, dataset_dir):
    loaded = CellscanModel.load_dir(model_dir)
    paths = sorted((dataset_dir / "test").rglob("*.png"))[:4]
    a = trained.model.score_images(paths)
    b = loaded.score_images(paths)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert loaded.threshold == pytest.approx(trained.model.threshold)
    rec = b.record(0)
    assert set(rec) == {"is_anomaly", "reconstruction_error", "threshold"}


def test_defects_score_higher_than_normals_on_average(trained):
    ev = trained.evaluation
    assert ev.scores[ev.labels == 1].mean() > ev.scores[ev.labels == 0].mean()


def test_wrong_batch_shape_is_refused(trained):
    with pytest.raises(ImageError, match=r"expected a batch of shape \(N, 32, 32, 1\)"):
        trained.model.score_arrays(np.zeros((1, 16, 16, 1), np.float32))


def test_failed_save_keeps_the_previous_model(trained, tmp_path, monkeypatch):
    target = tmp_path / "m"
    trained.model.save(target)
    before = (target / "meta.json").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(trained.model.keras_model, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        trained.model.with_threshold(123.0).save(target)
    assert (target / "meta.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m-")]


def test_loading_a_non_model_directory_is_explained(tmp_path):
    with pytest.raises(ModelError, match="missing model.keras"):
        CellscanModel.load_dir(tmp_path)
