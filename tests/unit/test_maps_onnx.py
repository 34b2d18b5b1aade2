"""maps.onnx: the pixel maps of the numpy scoring as an ONNX graph, equal to scipy's to float32 rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from cellscan.core.bundle import CellscanModel
from cellscan.core.config import ScoreParams
from cellscan.core.scoring import MapStats, anomaly_maps, maps_key, raw_maps, smooth
from cellscan.edge import OnnxMaps
from cellscan.mlops import maps_onnx


def _graph_maps(tmp_path, shape, channels, p, stats, x, y, prob):
    model = maps_onnx.build_maps_graph(shape, channels, p, stats, prob is not None)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "maps.onnx"))
    return OnnxMaps(tmp_path / "maps.onnx", maps_key(p), threads=1)(x, y, prob)


@pytest.mark.parametrize(("h", "w", "c", "kind", "sigma", "head_sigma", "dense_max"), [
    (40, 56, 1, "l2_ssim", 2.0, 4.0, 192),   # dense banded MatMul on both axes
    (40, 56, 1, "l2_ssim", 2.0, 4.0, 0),     # reflected edges and depthwise Conv
    (24, 17, 3, "ssim", 1.0, 0.0, 0),        # RGB, no head smoothing
    (9, 7, 1, "l2", 0.0, 6.0, 0),            # kernel wider than the image: repeated reflection
])
def test_graph_maps_equal_numpy(tmp_path, monkeypatch, h, w, c, kind, sigma, head_sigma, dense_max):
    monkeypatch.setattr(maps_onnx, "DENSE_MAX", dense_max)
    rng = np.random.default_rng(1)
    p = dataclasses.replace(ScoreParams(), map=kind, smooth_sigma=sigma, head_sigma=head_sigma)
    x = rng.random((3, h, w, c)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    stats = MapStats.fit(raw_maps(rng.random((6, h, w, c)).astype(np.float32),
                                  rng.random((6, h, w, c)).astype(np.float32), kind))
    prob = rng.random((3, h, w)).astype(np.float32)
    got, got_head = _graph_maps(tmp_path, (h, w), c, p, stats, x, y, prob)
    want = anomaly_maps(x, y, p, stats)
    assert got.shape == want.shape == (3, h, w)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))
    assert np.abs(got_head - smooth(prob, head_sigma)).max() < 1e-5


def test_blur_matrix_is_scipy_reflect():
    from scipy import ndimage

    v = np.random.default_rng(2).random(11)
    k = maps_onnx.gaussian_kernel(3.0)  # radius 11 > 11 - 1: the border reflects twice
    want = ndimage.gaussian_filter1d(v, 3.0, mode="reflect", truncate=3.5)
    assert np.allclose(maps_onnx.blur_matrix(11, k) @ v, want, atol=1e-6)


class _Marked:
    """A maps function that answers constant maps, to see when the model uses it."""

    def __init__(self, key):
        self.key = key
        self.calls = 0

    def __call__(self, x, recon, prob):
        self.calls += 1
        return np.full(x.shape[:3], 7.0, np.float32), None if prob is None else np.zeros(x.shape[:3], np.float32)


def test_model_uses_the_maps_graph_only_for_its_parameters():
    p = ScoreParams()
    meta = {"input_shape": [8, 8], "channels": 1, "threshold": 1.0, "score": dataclasses.asdict(p)}
    model = CellscanModel(None, meta)
    model.use_backend(lambda x: (x * 0.9, None))
    maps = _Marked(maps_key(p))
    model.use_maps(maps)
    x = np.random.default_rng(3).random((2, 8, 8, 1)).astype(np.float32)
    assert np.all(model.score_arrays(x).maps == 7.0) and maps.calls == 1
    other = dataclasses.replace(p, smooth_sigma=0.0)  # another map: numpy, not the graph
    assert not np.all(model.score_arrays(x, other).maps == 7.0) and maps.calls == 1
