from __future__ import annotations

import numpy as np
import pytest

from cellscan.core.config import ScoreParams
from cellscan.core.evaluate import image_metrics, pixel_auroc
from cellscan.core.scoring import (
    MapStats,
    aggregate,
    anomaly_maps,
    calibrate_threshold,
    f1_threshold,
    quantile_threshold,
    raw_maps,
    ssim_map,
)


@pytest.mark.parametrize(
    ("scores", "q", "expected"),
    [
        ([1, 2, 3, 4, 5], 0.5, 3.0),  # standard case: median
        ([1, 2, 3, 4, 5], 1.0 - 1e-9, 5.0),  # top quantile is (almost) the max
        ([2, 2, 2], 0.9, 2.0),  # constant scores
    ],
)
def test_quantile_threshold(scores, q, expected):
    assert quantile_threshold(np.array(scores, float), q) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 0, 1, 1], 0.55),  # clean separation: midway
        ([0.1, 0.5, 0.4, 0.9], [0, 0, 1, 1], 0.25),  # overlap: best F1 flags 3 of 4 (F1 0.8)
    ],
)
def test_f1_threshold(scores, labels, expected):
    assert f1_threshold(np.array(scores), np.array(labels)) == pytest.approx(expected)


def test_calibration_uses_anomalies_when_present():
    normal = np.array([0.1, 0.2, 0.3])
    assert calibrate_threshold(normal, None, 0.5) == pytest.approx(0.2)
    assert calibrate_threshold(normal, np.array([0.9]), 0.5) == pytest.approx(0.6)


def test_aggregations():
    m = np.zeros((2, 10, 10))
    m[0, 0, :5] = 1.0
    assert aggregate(m, "mean").tolist() == [0.05, 0.0]
    assert aggregate(m, "max").tolist() == [1.0, 0.0]
    assert aggregate(m, "topk_mean", 0.1).tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(m, "median")


def test_ssim_is_one_for_identical_and_lower_for_different():
    rng = np.random.default_rng(0)
    a = rng.random((1, 24, 24, 1))
    assert ssim_map(a, a).min() == pytest.approx(1.0)
    assert ssim_map(a, rng.random((1, 24, 24, 1))).mean() < 0.5


@pytest.mark.parametrize("kind", ["l2", "ssim", "l2_ssim"])
def test_maps_peak_where_the_reconstruction_is_wrong(kind):
    rng = np.random.default_rng(1)
    x = rng.random((1, 32, 32, 1)).astype(np.float32) * 0.2 + 0.4
    recon = x.copy()
    recon[0, 20:26, 5:11] = 0.0  # a wrong patch
    maps = anomaly_maps(x, recon, ScoreParams(map=kind, smooth_sigma=1.0))
    yy, xx = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    assert 18 <= yy <= 27 and 3 <= xx <= 12


def test_standardisation_removes_position_dependent_normal_error():
    rng = np.random.default_rng(2)
    x = rng.random((20, 16, 16, 1)).astype(np.float32)
    recon = x.copy()
    recon[:, :, :2] += 0.5  # every normal image has a large error on its left edge
    stats = MapStats.fit(raw_maps(x, recon, "l2_ssim"))
    p = ScoreParams(map="l2", smooth_sigma=0.0)
    raw = anomaly_maps(x[:1], recon[:1], p, None)
    normed = anomaly_maps(x[:1], recon[:1], p, stats)
    assert raw[0, :, :2].mean() > 10 * raw[0, :, 2:].mean()
    assert abs(normed[0, :, :2].mean()) < 1.0


def test_image_metrics_by_hand():
    m = image_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), 0.3)
    assert m["image_auroc"] == pytest.approx(0.75)  # 3 of 4 normal/anomaly pairs ordered right
    assert (m["precision"], m["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert m["f1"] == pytest.approx(0.8)


def test_pixel_auroc():
    maps = np.array([[[0.0, 1.0], [0.2, 0.1]]])
    masks = np.array([[[False, True], [False, False]]])
    assert pixel_auroc(maps, masks) == 1.0
    assert np.isnan(pixel_auroc(maps, np.zeros_like(masks)))
