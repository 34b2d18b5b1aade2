from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from cellscan.core.bundle import CellscanModel
from cellscan.core.augment import blob_mask, simulate_anomaly
from cellscan.core.config import ModelParams, ScoreParams
from cellscan.errors import ImageError, ModelError
from cellscan.core.model import build_network
from cellscan.core.scoring import MIN_VOTE, aggregate, separation, view_weights
from cellscan.core.train import working_shape

TINY = ModelParams(base_filters=4, depth=2, bottleneck=4, head_filters=4, head_depth=2)


def test_network_is_fully_convolutional_with_a_head():
    net = build_network(1, TINY)
    for h, w in ((32, 32), (16, 40)):  # one graph, any size that divides by 2**depth
        out = net(np.random.default_rng(0).random((2, h, w, 1)).astype(np.float32))
        recon, mask = np.asarray(out["recon"]), np.asarray(out["mask"])
        assert recon.shape == (2, h, w, 1) and mask.shape == (2, h, w, 1)
        assert 0.0 <= recon.min() and recon.max() <= 1.0
    rgb = build_network(3, ModelParams(base_filters=4, depth=1, bottleneck=4, head_filters=0))
    assert set(rgb.output) == {"recon"}
    assert not any("dense" in layer.name for layer in net.layers)


def test_working_shape_is_native_capped_and_divisible(tmp_path):
    from cellscan.core.config import Params
    from cellscan.core.images import save_png

    paths = []
    for i, (h, w) in enumerate([(100, 300), (100, 300), (90, 310)]):
        paths.append(tmp_path / f"{i}.png")
        save_png(np.zeros((h, w), np.float32), paths[-1])
    p = Params()
    assert working_shape(paths, p) == (104, 304)  # median, rounded up to a multiple of 8
    capped = p.with_overrides({"data.max_side": 160})
    assert working_shape(paths, capped) == (56, 160)
    assert working_shape(paths, p.with_overrides({"data.image_size": 64})) == (64, 64)


def test_simulated_anomaly_changes_only_the_mask_region():
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((32, 32, 1)), (2, 2, 0)).astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    changed = 0
    for _ in range(12):
        y, mask = simulate_anomaly(x, rng, np.stack([x[::-1], x[:, ::-1]]))
        assert mask.any() and mask.mean() < 0.5
        far = ~ndimage.binary_dilation(mask, iterations=3)  # beyond the soft edge of the blend
        np.testing.assert_allclose(y[..., 0][far], x[..., 0][far], atol=1e-3)
        changed += int(np.abs(y[..., 0][mask] - x[..., 0][mask]).mean() > 1e-3)
    assert changed >= 9
    assert blob_mask((16, 16), rng).shape == (16, 16)


def test_simulated_deformation_bends_only_the_mask_region():
    """A local deformation moves the image's own content inside its region and leaves the rest alone."""
    from cellscan.core.augment import simulate_warp

    rng = np.random.default_rng(2)
    x = ndimage.gaussian_filter(rng.random((64, 64, 1)), (1.5, 1.5, 0)).astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    changed = 0
    for _ in range(12):
        y, mask = simulate_warp(x, rng)
        assert y.shape == x.shape and y.dtype == np.float32 and mask.any() and mask.mean() < 0.5
        far = ~ndimage.binary_dilation(mask, iterations=3)
        np.testing.assert_allclose(y[..., 0][far], x[..., 0][far], atol=1e-3)
        changed += int(np.abs(y[..., 0][mask] - x[..., 0][mask]).mean() > 1e-2)
        assert abs(float(y[..., 0][mask].mean() - x[..., 0][mask].mean())) < 0.1  # moved, not darkened or brightened
    assert changed >= 9


def test_training_writes_a_complete_model(trained, model_dir):
    meta = json.loads((model_dir / "meta.json").read_text())
    assert {"input_shape", "channels", "threshold", "score", "params", "cellscan_version", "metrics", "fusion"} <= set(meta)
    assert meta["input_shape"] == [48, 48]  # the synthetic slices' own size
    assert set(meta["fusion"]) == {"recon", "head", "global"}  # three parts in the image score
    assert (model_dir / "global_view.npz").is_file()
    assert meta["n_params"] > 0 and meta["train_images_per_s"] > 0
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
    assert set(rec) == {"is_anomaly", "anomaly_score", "reconstruction_error", "threshold"}
    assert rec["is_anomaly"] == (rec["anomaly_score"] > rec["threshold"])


def test_defects_score_higher_than_normals_on_average(trained):
    ev = trained.evaluation
    assert ev.scores[ev.labels == 1].mean() > ev.scores[ev.labels == 0].mean()


def test_wrong_batch_shape_is_refused(trained):
    with pytest.raises(ImageError, match=r"expected a batch of shape \(N, 48, 48, 1\)"):
        trained.model.score_arrays(np.zeros((1, 16, 16, 1), np.float32))


def test_an_image_of_a_few_pixels_is_refused_not_scored(trained, tmp_path):
    from cellscan.core.images import encode_png

    tiny = encode_png(np.full((1, 1), 0.5, np.float32))
    with pytest.raises(ImageError, match=r"scan.png: image is 1x1 pixels; expected at least 8 on each side"):
        trained.model.load_pair(tiny, name="scan.png")
    (tmp_path / "thin.png").write_bytes(encode_png(np.full((3, 40), 0.5, np.float32)))
    with pytest.raises(ImageError, match=r"thin.png: image is 40x3 pixels"):
        trained.model.score_images([tmp_path / "thin.png"])
    assert trained.model.load(encode_png(np.full((8, 8), 0.5, np.float32))).shape == (48, 48, 1)


def test_saving_over_something_that_is_not_a_model_is_refused_and_loses_nothing(trained, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    (tmp_path / "scan.png").write_bytes(b"png")
    with pytest.raises(ModelError, match=r"holds other files \(keep.txt\) and no model directory"):
        trained.model.save(tmp_path / "notes")
    with pytest.raises(ModelError, match="scan.png is a file"):
        trained.model.save(tmp_path / "scan.png")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"
    assert (tmp_path / "scan.png").read_bytes() == b"png"
    for name, files in (("repo", [".git"]), ("export", ["meta.json", "export.json", "model.onnx"])):
        for f in files:  # a folder of hidden files only; an export (it has a meta.json, no model.keras)
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f).write_text("x")
        with pytest.raises(ModelError, match="holds other files"):
            trained.model.save(tmp_path / name)
    (tmp_path / "empty" / ".gitkeep").parent.mkdir()
    (tmp_path / "empty" / ".gitkeep").write_text("")
    for target in (tmp_path / "empty", tmp_path / "empty"):  # an empty folder, then an earlier model: replaced
        assert (trained.model.save(target) / "meta.json").is_file()
    assert oct((tmp_path / "empty").stat().st_mode & 0o777) == oct(0o755)  # not mkdtemp's 0700


def test_a_half_written_bundle_is_a_model_error(trained, tmp_path):
    target = trained.model.save(tmp_path / "m")
    for text, needle in (("[1, 2]", "not an object"), ("{}", "missing channels, threshold, score")):
        bad = tmp_path / f"bad{len(text)}"
        shutil.copytree(target, bad)
        (bad / "meta.json").write_text(text)
        with pytest.raises(ModelError, match=f"meta.json: not a cellscan model's meta.json \\({needle}"):
            CellscanModel.load_dir(bad)
    (target / "map_stats.npz").write_bytes(b"junk")
    with pytest.raises(ModelError, match=r"cannot read .*map_stats.npz"):
        CellscanModel.load_dir(target)


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
    with pytest.raises(ModelError, match="model directory does not exist: .*nothere"):
        CellscanModel.load_dir(tmp_path / "nothere")
    (tmp_path / "f").write_text("")
    with pytest.raises(ModelError, match="f is a file; expected a model directory"):
        CellscanModel.load_dir(tmp_path / "f")


def test_a_model_directory_without_a_part_its_threshold_counts_on_is_refused(trained, model_dir, tmp_path):
    import shutil

    saved = sorted(p.name for p in model_dir.iterdir())
    parts = [name for name in ("map_stats.npz", "global_view.npz") if name in saved]
    assert parts == ["map_stats.npz", "global_view.npz"], saved  # what this tiny model's fusion uses
    for name in parts:
        copy = tmp_path / name / "model"
        shutil.copytree(model_dir, copy)
        (copy / name).unlink()  # a half-copied export or bundle
        with pytest.raises(ModelError, match=f"{name} missing, though its meta.json was calibrated with it"):
            CellscanModel.load_dir(copy, network=False)
    assert CellscanModel.load_dir(model_dir, network=False).global_view is not None


def test_perlin_masks_and_ct_defects_are_local_and_change_the_image():
    from cellscan.core.augment import ct_defect, perlin, perlin_mask, random_crop

    rng = np.random.default_rng(1)
    noise = perlin((40, 64), 4, rng)
    assert noise.shape == (40, 64) and -1.5 < noise.min() < 0 < noise.max() < 1.5
    for _ in range(10):
        m = perlin_mask((48, 48), rng)
        assert 4 <= m.sum() < 0.7 * m.size
    x = np.full((48, 48, 1), 0.5, np.float32)
    for _ in range(12):
        src, mask = ct_defect(x, rng)
        assert src.shape == x.shape and mask.shape == (48, 48)
        assert mask.any() and mask.mean() < 0.5
    assert random_crop(np.zeros((20, 30, 1), np.float32), 24, rng).shape == (24, 24, 1)  # padded when small


def test_faint_ct_defect_is_a_soft_change_of_a_few_grains_that_keeps_the_grain():
    from scipy import ndimage

    from cellscan.core.augment import CT_KINDS, ct_defect

    rng = np.random.default_rng(2)
    x = (0.5 + 0.03 * rng.standard_normal((64, 64, 1))).astype(np.float32)  # grain about 0.03
    for _ in range(8):
        src, mask = ct_defect(x, rng, kind=CT_KINDS.index("faint"))
        change = (src - x)[..., 0]
        assert mask.any() and mask.mean() < 0.5
        assert 0.02 < np.abs(change).max() < 0.2  # a few times the grain, not a flat fill
        assert np.allclose(change, ndimage.gaussian_filter(change, 0.5), atol=0.02)  # smooth: the grain stays
        assert np.abs(change[~ndimage.binary_dilation(mask, iterations=3)]).max() < 0.3 * np.abs(change).max()


def test_fusion_standardises_both_parts():
    from cellscan.core.scoring import fuse

    recon_scores = np.array([1.0, 1.0])
    head = np.zeros((2, 4, 4), np.float32)
    head[1, 2, 2] = 0.8
    stats = {"recon": [1.0, 0.5], "head": [0.1, 0.1]}
    scores, maps = fuse(recon_scores, np.ones((2, 4, 4), np.float32), head, "sum", stats)
    assert scores[1] - scores[0] == pytest.approx(8.0)  # only the head differs: (0.8 - 0) / 0.1
    assert maps.shape == (2, 4, 4) and maps[1].argmax() == 10
    only_recon, _ = fuse(recon_scores, np.ones((2, 4, 4)), head, "recon", stats)
    np.testing.assert_array_equal(only_recon, recon_scores)
    no_head, _ = fuse(recon_scores, np.ones((2, 4, 4)), None, "sum", stats)
    np.testing.assert_array_equal(no_head, recon_scores)


def test_views_fusion_weighs_the_network_once_and_old_bundles_keep_their_rule(trained, dataset_dir):
    """``views`` averages the reconstruction and head scores, weighs them by ``network_weight``, then adds
    the image views; a bundle whose saved score parameters say ``sum`` (trained before ``views``) or lack
    the weight (saved before it: a full vote) scores as it did."""
    from dataclasses import replace

    from cellscan.core.scoring import aggregate, fuse

    recon = np.array([0.0, 2.0])
    head = np.zeros((2, 3, 3), np.float32)
    head[1, 1, 1] = 4.0
    stats = {"recon": [0.0, 1.0], "head": [0.0, 1.0], "global": [0.0, 1.0]}
    glob = np.array([0.0, 3.0])
    s_views, m_views = fuse(recon, np.zeros((2, 3, 3)), head, "views", stats, glob)
    s_sum, m_sum = fuse(recon, np.zeros((2, 3, 3)), head, "sum", stats, glob)
    np.testing.assert_allclose(s_views, [0.0, (2.0 + 4.0) / 2 + 3.0])
    np.testing.assert_allclose(s_sum, [0.0, 2.0 + 4.0 + 3.0])
    np.testing.assert_allclose(m_views, m_sum / 2)  # the map: the network's two maps averaged
    s_half, m_half = fuse(recon, np.zeros((2, 3, 3)), head, "views", stats, glob, None, 0.5)
    np.testing.assert_allclose(s_half, [0.0, 0.5 * (2.0 + 4.0) / 2 + 3.0])
    np.testing.assert_allclose(m_half, m_views)  # the weight is the image score's; the map stays

    model = trained.model
    p = model.score_params
    assert (p.fusion, p.network_weight) == ("views", 0.5)  # the defaults for new models
    x = np.stack([model.load(q) for q in sorted((dataset_dir / "test").rglob("*.png"))[:6]])
    views = model.score_arrays(x).scores
    old = model.with_score_params(replace(p, fusion="sum")).score_arrays(x).scores
    full = model.with_score_params(replace(p, network_weight=1.0)).score_arrays(x).scores
    st = model.meta["fusion"]
    _, rmap, hmap = model._parts(x, p)
    r = (aggregate(rmap, p.aggregation, p.topk) - st["recon"][0]) / st["recon"][1]
    h = (hmap.reshape(len(x), -1).max(axis=1) - st["head"][0]) / st["head"][1]
    net = r + h
    np.testing.assert_allclose(old - full, net / 2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(full - views, net / 4, rtol=1e-4, atol=1e-4)
    meta = json.loads(json.dumps(model.meta))
    del meta["score"]["network_weight"]  # as saved before the weight existed
    older = CellscanModel(model.keras_model, meta, model.stats, model.global_view, model.patch_view)
    assert older.score_params.network_weight == 1.0
    np.testing.assert_allclose(older.score_arrays(x).scores, full, rtol=1e-5, atol=1e-5)


def test_global_view_changes_the_score_and_can_be_switched_off(trained, dataset_dir):
    """The whole-image view is part of the fused score; global_side 0 leaves the two network parts."""
    from dataclasses import replace

    model = trained.model
    paths = sorted((dataset_dir / "test").rglob("*.png"))[:6]
    x = np.stack([model.load(q) for q in paths])
    with_view = model.score_arrays(x).scores
    without = model.score_arrays(x, replace(model.score_params, global_side=0)).scores
    expected = (model.global_view.scores(x) - model.meta["fusion"]["global"][0]) / model.meta["fusion"]["global"][1]
    np.testing.assert_allclose(with_view - without, expected, rtol=1e-4, atol=1e-4)


def _with_view_fitted_by_hand(model, dataset_dir, name, view_cls):
    """The trained model with one place view fitted on its training normals (all but the last 8, which
    standardise it), and six test images scored with it and with it switched off (``<name>_side: 0``)."""
    from dataclasses import replace

    normals = np.stack([model.load(q) for q in sorted((dataset_dir / "train" / "good").glob("*.png"))])
    views = {"patch_view": None, "texture_view": None} | {f"{name}_view": view_cls.fit(normals[:-8], side=128)}
    m = CellscanModel(model.keras_model, json.loads(json.dumps(model.meta)), model.stats, model.global_view, **views)
    m.fit_stats(normals[-8:])
    x = np.stack([m.load(q) for q in sorted((dataset_dir / "test").rglob("*.png"))[:6]])
    without = m.score_arrays(x, replace(m.score_params, **{f"{name}_side": 0})).scores
    return m, x, m.score_arrays(x).scores, without


def _added_by_view(m, x, name):
    """What a hand-fitted view adds to the ``views`` score: its standardised score with its weight, and the
    whole-image view's and the network's change from their weights without it to their weights beside it."""
    sep, power = m.meta["fusion"]["separation"], m.score_params.separation_power
    w, alone = view_weights(sep, ["global", name, "network"], power), view_weights(sep, ["global", "network"], power)
    z = _standardised(m, x, ("global", name))
    return ((w["global"] - alone["global"]) * z["global"] + w[name] * z[name]
            + (w["network"] - alone["network"]) * _network_vote(m, x))


def _network_vote(m, x):
    """The network's standardised score as ``views`` reads it: reconstruction and head averaged."""
    p, st = m.score_params, m.meta["fusion"]
    _, rmap, hmap = m._parts(x, p)
    r = (aggregate(rmap, p.aggregation, p.topk) - st["recon"][0]) / st["recon"][1]
    h = (hmap.reshape(len(x), -1).max(axis=1) - st["head"][0]) / st["head"][1]
    return (r + h) / 2


def _standardised(m, x, names):
    """Each named view's image scores, standardised by the model's hold-out statistics."""
    st = m.meta["fusion"]
    return {n: (getattr(m, f"{n}_view").scores(x) - st[n][0]) / st[n][1] for n in names}


def test_patch_view_joins_the_sum_and_survives_save_and_load(trained, dataset_dir, tmp_path):
    """The window bank's score is standardised on hold-out normals and added; saved and loaded with the model.

    The session's synthetic slices are 48 px, under ``PatchView.MIN_SIDE``: training leaves the view out,
    so here it is fitted by hand on the training normals.
    """
    from cellscan.core.scoring import PatchView

    model = trained.model
    assert model.patch_view is None and not PatchView.usable(model.shape)
    m, x, with_view, without = _with_view_fitted_by_hand(model, dataset_dir, "patch", PatchView)
    assert m.meta["fusion"]["patch"][1] > 0
    np.testing.assert_allclose(with_view - without, _added_by_view(m, x, "patch"), rtol=1e-4, atol=1e-4)
    loaded = CellscanModel.load_dir(m.save(tmp_path / "with-patches"))
    assert (tmp_path / "with-patches" / "patch_view.npz").is_file()
    np.testing.assert_allclose(loaded.score_arrays(x).scores, with_view, rtol=1e-5, atol=1e-5)


def test_larger_images_keep_their_views_at_half_the_working_size(trained):
    """A 320-pixel working size gets its patch and texture views at 160 pixels (``view_scale`` 0.5), not
    squeezed to ``patch_side`` / ``texture_side`` (128); ``view_scale`` 0 keeps the fixed side."""
    rng = np.random.default_rng(0)
    normals = (0.5 + 0.05 * rng.standard_normal((4, 320, 240, 1))).astype(np.float32)
    halved = trained.model.with_score_params(ScoreParams())
    halved.fit_global(normals)
    assert halved.patch_view.shape == (160, 120) and halved.texture_view.shape == (160, 120)
    fixed = trained.model.with_score_params(ScoreParams(view_scale=0.0))
    fixed.fit_global(normals)
    assert fixed.patch_view.shape == (128, 96) and fixed.texture_view.shape == (128, 96)
    assert trained.model.patch_view is None  # the copies' fits leave the session's model alone


def test_views_are_weighed_by_how_well_each_tells_simulated_defects_from_normals(trained, dataset_dir):
    """fit_stats keeps each part's separation of defects simulated on the hold-out images: an image view's
    is the mean of its CT-like defects' and local deformations' separations, the network's the
    deformations' alone (its head trains on CT-like defects). A view that cannot see them (here the
    whole-image view made blind: the same score for every image) keeps only the least vote (``MIN_VOTE``,
    before the weights are scaled to one vote each on average); ``view_weights: equal`` or a bundle fitted
    without separations gives each image view one vote and the network ``network_weight``."""
    from dataclasses import replace

    from cellscan.core.scoring import GlobalView, PatchView

    class Blind(GlobalView):
        def scores(self, x):
            return np.ones(len(x), np.float32)

    model = trained.model
    m, x, weighted, _ = _with_view_fitted_by_hand(model, dataset_dir, "patch", PatchView)
    sep, family = m.meta["fusion"]["separation"], m.meta["fusion"]["separation_by_family"]
    assert set(sep) == {"global", "patch", "network"}
    assert sep["patch"] > 0.7  # the bank sees pores, particles, cracks (faint smudges less well)
    assert set(family["ct"]) == {"global", "patch"} and set(family["warp"]) == {"global", "patch", "network"}
    assert sep["patch"] == pytest.approx((family["ct"]["patch"] + family["warp"]["patch"]) / 2, abs=1e-3)
    assert sep["network"] == family["warp"]["network"]
    z = _standardised(m, x, ("global", "patch"))
    equal = m.score_arrays(x, replace(m.score_params, view_weights="equal")).scores
    w = view_weights(sep, ["global", "patch", "network"], m.score_params.separation_power)
    np.testing.assert_allclose(
        weighted - equal,
        (w["global"] - 1) * z["global"] + (w["patch"] - 1) * z["patch"] + (w["network"] - 0.5) * _network_vote(m, x),
        rtol=1e-4, atol=1e-4)
    meta = json.loads(json.dumps(m.meta))
    del meta["fusion"]["separation"]  # as fitted before the weights existed
    older = CellscanModel(m.keras_model, meta, m.stats, m.global_view, patch_view=m.patch_view)
    np.testing.assert_allclose(older.score_arrays(x).scores, equal, rtol=1e-5, atol=1e-5)

    assert m.score_params.separation_power == 2.0  # the default: separations squared
    by_separation = m.score_arrays(x, replace(m.score_params, separation_power=1.0)).scores
    assert not np.allclose(by_separation, weighted, atol=1e-3)
    meta = json.loads(json.dumps(m.meta))
    del meta["score"]["separation_power"]  # as saved before the power existed: each part by its separation
    before = CellscanModel(m.keras_model, meta, m.stats, m.global_view, patch_view=m.patch_view)
    np.testing.assert_allclose(before.score_arrays(x).scores, by_separation, rtol=1e-5, atol=1e-5)

    normals = np.stack([m.load(q) for q in sorted((dataset_dir / "train" / "good").glob("*.png"))])
    blind_view = Blind(m.global_view.mean, m.global_view.components, m.global_view.shape)
    blind = CellscanModel(m.keras_model, json.loads(json.dumps(m.meta)), m.stats, blind_view, patch_view=m.patch_view)
    blind.fit_stats(normals[-8:])
    assert blind.meta["fusion"]["separation"] == {"global": 0.0, "patch": sep["patch"], "network": sep["network"]}
    w = view_weights(blind.meta["fusion"]["separation"], ["global", "patch"])
    scale = 2 / (MIN_VOTE + 2.0)  # raw votes: 0 -> MIN_VOTE and 2 (the mean separation is half the patch view's)
    assert w == pytest.approx({"global": MIN_VOTE * scale, "patch": 2.0 * scale})


def test_separation_reads_ranks_and_stops_at_chance():
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(400)
    assert separation(normal, rng.standard_normal(400)) < 0.25  # the same distribution: about chance
    shifted = separation(normal, rng.standard_normal(400) + 1.0)
    assert 0.8 < shifted < 1.2  # a unit shift of a unit-variance score: d' about 1
    assert separation(normal, rng.standard_normal(400) - 1.0) == 0.0  # lower than normals: no weight
    assert separation(np.exp(normal), np.exp(rng.standard_normal(400) + 1.0)) == pytest.approx(shifted, abs=0.2)
    assert separation(normal, normal + 100.0) == pytest.approx(np.sqrt(2) * 3.09, abs=0.01)  # clipped AUROC
    assert separation(normal[:0], normal) == 0.0


def test_patch_view_is_left_out_where_its_windows_would_not_fit():
    from cellscan.core.scoring import PatchView

    assert PatchView.usable((256, 256)) and PatchView.usable((64, 64))
    assert not PatchView.usable((28, 28))  # digits: a window is most of the object
    assert not PatchView.usable((64, 2048))  # at 128 px on the long side it would be 4 px high
    assert PatchView.usable((64, 2048), side=1024)


def test_patch_view_finds_a_small_pore_on_a_bright_or_dark_image():
    """Local contrast equalisation: a darker normal image is not an anomaly, a 3-pixel pore on it is."""
    from cellscan.core.scoring import PatchView

    rng = np.random.default_rng(1)
    texture = lambda n: ndimage.gaussian_filter(rng.standard_normal((n, 96, 96)), (0, 0.8, 3.0))[..., None]
    normals = (0.5 + 0.08 * texture(30)).astype(np.float32)
    view = PatchView.fit(normals, side=96)
    dark = (0.2 + 0.03 * texture(4)).astype(np.float32)
    pore = dark.copy()
    pore[:, 40:43, 50:53] = 0.02
    s_normal, s_dark, s_pore = (view.scores(a) for a in (normals[:4], dark, pore))
    assert s_dark.max() < 1.5 * s_normal.max()
    assert s_pore.min() > s_dark.max()


def test_patch_view_weighs_each_place_by_how_much_normals_vary_there():
    """A busy rim that differs in every normal image is not an anomaly; a faint pore in the calm middle is.

    The raw nearest-window distance ranks them the other way round (the rim's new pattern is far from the
    bank too): the check that each place is standardised by the training normals' distances there.
    """
    from cellscan.core.scoring import PatchView

    rng = np.random.default_rng(1)

    def images(n):
        a = 0.5 + 0.08 * ndimage.gaussian_filter(rng.standard_normal((n, 96, 96)), (0, 0.8, 3.0))
        a[:, :, :12] = 0.5 + 1.2 * ndimage.gaussian_filter(rng.standard_normal((n, 96, 12)), (0, 1.0, 1.0))
        return np.clip(a, 0, 1)[..., None].astype(np.float32)

    view = PatchView.fit(images(30), side=96)
    new, pore = images(4), images(4)
    pore[:, 40:43, 50:53] = 0.38
    assert view.scores(pore).min() > 2 * view.scores(new).max()
    raw = PatchView(view.mean, view.components, view.bank, view.shape)  # the same bank, no place statistics
    assert raw.scores(pore).min() < raw.scores(new).max()
    loaded = PatchView.from_arrays(view.to_arrays())
    np.testing.assert_allclose(loaded.scores(pore), view.scores(pore), rtol=1e-6)
    assert raw.scores(new[:0]).shape == (0,)


def test_texture_view_joins_the_views_and_survives_save_and_load(trained, dataset_dir, tmp_path):
    """The texture bank's score is standardised on hold-out normals and added with its weight; saved and
    loaded with the model; a bundle without it scores as before (fitted by hand: the slices are 48 px)."""
    from cellscan.core.scoring import TextureView

    model = trained.model
    assert model.texture_view is None and not TextureView.usable(model.shape)
    m, x, with_view, without = _with_view_fitted_by_hand(model, dataset_dir, "texture", TextureView)
    assert m.meta["fusion"]["texture"][1] > 0
    np.testing.assert_allclose(with_view - without, _added_by_view(m, x, "texture"), rtol=1e-4, atol=1e-4)
    loaded = CellscanModel.load_dir(m.save(tmp_path / "with-texture"))
    assert (tmp_path / "with-texture" / "texture_view.npz").is_file()
    np.testing.assert_allclose(loaded.score_arrays(x).scores, with_view, rtol=1e-5, atol=1e-5)
    (tmp_path / "with-texture" / "texture_view.npz").unlink()  # as saved before the view existed:
    meta = json.loads((tmp_path / "with-texture" / "meta.json").read_text())  # not calibrated with it either
    del meta["fusion"]["texture"]
    (tmp_path / "with-texture" / "meta.json").write_text(json.dumps(meta))
    np.testing.assert_allclose(CellscanModel.load_dir(tmp_path / "with-texture").score_arrays(x).scores, without,
                               rtol=1e-5, atol=1e-5)


def test_texture_view_finds_a_region_whose_grain_or_direction_differs():
    """Streaks that run the other way, or a finer grain at the same contrast: no dark or bright spot, the
    texture at that place is what differs. A darker normal image (its grain and contrast unchanged) is not
    an anomaly."""
    from cellscan.core.scoring import TextureView

    rng = np.random.default_rng(2)
    streaks = lambda n, sy=0.8, sx=3.0: ndimage.gaussian_filter(rng.standard_normal((n, 96, 96)), (0, sy, sx))

    def norm(a):  # every texture at the same contrast
        return a / a.std(axis=(1, 2), keepdims=True)

    normals = (0.5 + 0.08 * norm(streaks(30)))[..., None].astype(np.float32)
    view = TextureView.fit(normals, side=96)
    fresh = (0.5 + 0.08 * norm(streaks(4)))[..., None].astype(np.float32)
    dark = (0.2 + 0.08 * norm(streaks(4)))[..., None].astype(np.float32)
    turned, fine = fresh.copy(), fresh.copy()
    turned[:, 30:66, 30:66] = 0.5 + 0.08 * norm(streaks(4, 3.0, 0.8))[:, 30:66, 30:66, None]
    fine[:, 30:66, 30:66] = 0.5 + 0.08 * norm(streaks(4, 0.5, 0.5))[:, 30:66, 30:66, None]
    s_fresh, s_dark = view.scores(fresh), view.scores(dark)
    assert s_dark.max() < 1.5 * max(s_fresh.max(), 1.0)
    assert view.scores(turned).min() > s_fresh.max() + 3
    assert view.scores(fine).min() > s_fresh.max() + 3
    loaded = TextureView.from_arrays(view.to_arrays())
    np.testing.assert_allclose(loaded.scores(fine), view.scores(fine), rtol=1e-6)
    assert TextureView.usable((256, 256)) and not TextureView.usable((28, 28))


def test_texture_view_keeps_its_scales_and_loads_views_saved_before_them():
    """The view's scales travel with its arrays; a view saved before they did (no ``scales``, a bank of
    three scales' features) is read at the three scales it was fitted with and scores as it did."""
    from cellscan.core.scoring import TextureView

    rng = np.random.default_rng(4)
    normals = (0.5 + 0.05 * ndimage.gaussian_filter(rng.standard_normal((10, 64, 64)), (0, 1.0, 2.0)))[..., None]
    normals = normals.astype(np.float32)
    odd = normals[:2].copy()
    odd[1, 20:40, 20:40] = 0.5
    view = TextureView.fit(normals, side=64)
    assert view.scales == TextureView.SCALES and len(TextureView.SCALES) == 5
    # five derivative energies per scale and the total, kept as their first DIMS principal components
    assert view.components.shape == (TextureView.DIMS, 5 * 5 + 1) and view.bank.shape[1] == TextureView.DIMS
    cov = np.cov(view.bank.T.astype(np.float64))  # principal components: uncorrelated, largest first
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-3 * cov[0, 0]
    assert (np.diff(np.diag(cov)) <= 1e-6 * cov[0, 0]).all()
    loaded = TextureView.from_arrays(view.to_arrays())
    assert loaded.scales == view.scales
    np.testing.assert_allclose(loaded.scores(odd), view.scores(odd), rtol=1e-6)
    four = TextureView.from_arrays(TextureView(view.mean, view.components, view.bank, view.shape,
                                               scales=(1.0, 2.0, 4.0, 8.0)).to_arrays())
    assert four.scales == (1.0, 2.0, 4.0, 8.0)  # a view fitted at four scales is read at four

    class ThreeScales(TextureView):  # fitted as before the fourth scale and the principal components
        SCALES = TextureView.SAVED_BEFORE_SCALES

        @classmethod
        def _axes(cls, z):
            return np.eye(z.shape[1])  # each feature kept, scaled alone

    older = ThreeScales.fit(normals, side=64)
    arrays = older.to_arrays()
    del arrays["scales"]  # as saved before the scales were stored
    read = TextureView.from_arrays(arrays)
    assert read.scales == (1.0, 2.0, 4.0) and read.components.shape == (16, 16)
    assert np.count_nonzero(read.components - np.diag(np.diag(read.components))) == 0  # per-feature scaling
    np.testing.assert_allclose(read.scores(odd), older.scores(odd), rtol=1e-6)
    assert read.scores(odd)[1] > read.scores(odd)[0]


def test_training_without_validation_normals_stops_before_fitting(tmp_path, monkeypatch):
    import cellscan.core.train as train_mod
    from cellscan.core.config import Params
    from cellscan.core.images import save_png
    from cellscan.errors import DatasetError

    (tmp_path / "training").mkdir()
    (tmp_path / "validation").mkdir()  # present but empty
    for i in range(4):
        save_png(np.full((32, 32), 0.1 * i, np.float32), tmp_path / "training" / f"{i}.png")

    def no_fit(*args, **kwargs):  # type: ignore[no-untyped-def]
        msg = "trained although the run could not end well"
        raise AssertionError(msg)

    monkeypatch.setattr(train_mod, "fit_model", no_fit)
    with pytest.raises(DatasetError, match="no validation normals"):
        train_mod.train(Params(), tmp_path)
