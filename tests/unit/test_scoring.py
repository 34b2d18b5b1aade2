from __future__ import annotations

import numpy as np
import pytest

from cellscan.core.config import ScoreParams
from cellscan.core.evaluate import Evaluation, image_metrics, pixel_auroc
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


def test_anomalies_that_score_below_the_normals_leave_the_normals_quantile():
    normal = np.array([0.5, 0.6, 0.7, 0.8])
    t = calibrate_threshold(normal, np.array([0.1, 0.05]), 0.75)
    assert t == pytest.approx(np.quantile(normal, 0.75))  # F1's best flags every normal to catch one
    assert (normal > t).sum() == 1
    assert calibrate_threshold(normal, np.array([0.1]), 0.75) == pytest.approx(0.725)  # F1 0 everywhere


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


def test_detection_by_defect_size_counts_each_band_against_all_normals():
    masks = np.zeros((6, 16, 16), bool)
    masks[2, :2, :3] = True  # 6 px
    masks[3, :5, :5] = True  # 25 px
    masks[4, :8, :8] = True  # 64 px
    masks[5, :4, :8] = True  # 32 px
    labels = np.array([0, 0, 1, 1, 1, 1])
    scores = np.array([0.2, 0.6, 0.1, 0.5, 0.9, 0.7])
    ev = Evaluation(0.55, {}, labels, scores, ["good"] * 2 + ["void"] * 4, [], np.zeros((6, 16, 16)), masks)
    got = ev.by_area()
    assert list(got) == ["1-16", "16-40", "40-100"]
    assert got["1-16"] == {"n": 1, "image_auroc": 0.0, "recall": 0.0}  # below both normals
    assert got["16-40"]["n"] == 2 and got["16-40"]["image_auroc"] == pytest.approx(0.75)  # 0.5 beats 0.2 only
    assert got["16-40"]["recall"] == pytest.approx(0.5)  # 0.7 over the threshold, 0.5 not
    assert got["40-100"] == {"n": 1, "image_auroc": 1.0, "recall": 1.0}
    assert Evaluation(0.5, {}, labels, scores, [], [], np.zeros((6, 16, 16))).by_area() == {}  # no masks


def test_pixel_auroc_leaves_out_defects_without_a_mask(trained, dataset_dir, tmp_path):
    import shutil

    from cellscan.core.data import load_dataset
    from cellscan.core.evaluate import evaluate_model

    data = tmp_path / "cells"
    shutil.copytree(dataset_dir, data)
    masks = sorted((data / "ground_truth").rglob("*.png"))
    masks[0].unlink()  # one known anomaly without its mask (the roles layout has none)
    ev = evaluate_model(trained.model, load_dataset(data))
    marked = np.array([label == 0 or m.any() for label, m in zip(ev.labels, ev.masks, strict=True)])
    assert not marked.all()
    assert ev.metrics["pixel_auroc"] == pytest.approx(pixel_auroc(ev.maps[marked], ev.masks[marked]))
    assert ev.metrics["pixel_auroc"] != pytest.approx(pixel_auroc(ev.maps, ev.masks))  # not all-negative


def test_pixel_auroc():
    maps = np.array([[[0.0, 1.0], [0.2, 0.1]]])
    masks = np.array([[[False, True], [False, False]]])
    assert pixel_auroc(maps, masks) == 1.0
    assert np.isnan(pixel_auroc(maps, np.zeros_like(masks)))


def test_views_heatmap_adds_each_place_map_where_it_points():
    """The ``views`` map: the network's map with its weight plus each place view's map, brought to the
    image's size and standardised and weighted like its score; the place with the view's finding is where
    the heatmap peaks, though the network's map is flat there."""
    from cellscan.core.scoring import fuse, place_scores, view_weights

    n, size = 2, 32
    net_map = np.zeros((n, size, size), np.float32)
    net_map[:, 2:4, 2:4] = 1.0  # the network's mild spot in a corner
    grid = np.zeros((n, 8, 8), np.float32)
    grid[1, 5, 6] = 9.0  # the patch view's finding in image 1, at place (5, 6) of an 8x8 grid
    st = {"recon": [0.0, 1.0], "patch": [1.0, 2.0], "separation": {"patch": 1.5, "texture": 0.5}}
    scores, maps = fuse(net_map.reshape(n, -1).max(axis=1), net_map, None, "views", st,
                        patch_scores=place_scores(grid), network_weight=0.5, place_maps={"patch": grid})
    w = view_weights(st["separation"], ["patch"])["patch"]
    assert w == 1.0  # the only view present
    np.testing.assert_allclose(scores, 0.5 * 1.0 + (place_scores(grid) - 1.0) / 2.0)
    y, x = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert abs(y - 5 * (size - 1) / 7) <= 1 and abs(x - 6 * (size - 1) / 7) <= 1
    np.testing.assert_allclose(maps[0], 0.5 * net_map[0] - 0.5, atol=1e-6)  # a flat place map: only the network
    assert 3.0 < maps[1].max() <= (9.0 - 1.0) / 2.0 + 1e-5  # at most the place's standardised value
    _, same = fuse(scores, net_map, None, "views", st, patch_scores=place_scores(grid), network_weight=0.5)
    np.testing.assert_allclose(same, net_map)  # no place maps given: the network's map as before
    _, summed = fuse(scores, net_map, None, "sum", st, patch_scores=place_scores(grid), place_maps={"patch": grid})
    np.testing.assert_allclose(summed, net_map)  # sum (older bundles) keeps the network's map


def _two_pattern_normals(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normals made of two fixed 16 x 16 patterns in random amounts, plus a little noise: (images, patterns)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    patterns = np.stack([np.sin(3 * xx), np.cos(2 * yy)])
    amounts = rng.standard_normal((n, 2))
    x = 0.5 + 0.1 * np.einsum("nk,khw->nhw", amounts, patterns) + 0.005 * rng.standard_normal((n, 16, 16))
    return x[..., None].astype(np.float32), patterns


def test_global_view_sees_an_image_inside_the_normal_subspace_but_far_along_it():
    """T^2: an image made of the normals' own patterns, but in an amount no normal shows, leaves no residual;
    the residual alone (views saved before T^2) scores it about as high as the normals, the combined score far above."""
    from cellscan.core.scoring import GlobalView

    normals, patterns = _two_pattern_normals()
    view = GlobalView.fit(normals, side=16)
    far = (0.5 + 0.1 * 8.0 * patterns[0])[None, ..., None].astype(np.float32)  # eight spreads along pattern 0
    residual, t2 = view._readings(view._small(far))
    assert residual[0] < 3 * view.norms[0] and t2[0] > 30
    fresh = _two_pattern_normals(seed=1)[0][:20]
    assert view.scores(far)[0] > 5 * view.scores(fresh).max()
    older = GlobalView.from_arrays({k: v for k, v in view.to_arrays().items() if k not in ("spread", "norms")})
    assert older.spread is None
    np.testing.assert_allclose(older.scores(far), residual.astype(np.float32))
    assert older.scores(far)[0] < 2 * older.scores(fresh).max()


def test_global_view_round_trips_with_its_spreads():
    from cellscan.core.scoring import GlobalView

    normals, _ = _two_pattern_normals()
    view = GlobalView.fit(normals[:40], side=8)
    again = GlobalView.from_arrays(view.to_arrays())
    np.testing.assert_allclose(again.scores(normals[40:]), view.scores(normals[40:]), rtol=1e-6)
    assert again.norms == pytest.approx(view.norms)


def test_the_verdict_is_taken_in_float64_as_its_reader_takes_it():
    """A float32 score at the float32 rounding of the threshold: NumPy 2 compares it in float32 (not above),
    the JSON reader in float64 (above). The answer must say what its own numbers say."""
    from cellscan.core.bundle import ScoreResult

    scores = np.array([0.1, 0.05], np.float32)
    res = ScoreResult(scores, scores, np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4, 1), np.float32), 0.1)
    rec = res.record(0)
    assert rec["is_anomaly"] == (rec["anomaly_score"] > rec["threshold"]) is True
    assert res.is_anomaly.tolist() == [True, False]
