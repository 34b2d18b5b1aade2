from __future__ import annotations

import numpy as np
import pytest

from cellscan.core.data import ROLE_FOLDERS, folder_for, load_dataset
from cellscan.errors import DatasetError
from cellscan.core.images import load_image
from cellscan.core.synth import DEFECTS, generate, render_slice


def _small(root, layout="mvtec", seed=3):
    return generate(root, layout=layout, size=40, n_train=4, n_test_good=2, n_per_defect=1, seed=seed)


def test_generation_is_deterministic(tmp_path):
    _small(tmp_path / "a")
    _small(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_another_seed_gives_other_images(tmp_path):
    _small(tmp_path / "a", seed=1)
    _small(tmp_path / "b", seed=2)
    f = "train/good/train_0000.png"
    assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_has_a_mask_where_the_image_changed(defect):
    clean, mask0 = render_slice(np.random.default_rng(5), 64, None)
    bad, mask = render_slice(np.random.default_rng(5), 64, defect)
    assert not mask0.any()
    assert 0 < mask.sum() < 0.25 * mask.size
    # Same rng stream up to the defect: the defect region differs from the clean slice more than elsewhere.
    diff = np.abs(bad - clean)
    assert diff[mask].mean() > diff[~mask].mean()


def test_16bit_output_is_read_back_as_16bit(tmp_path):
    _small(tmp_path)
    x = load_image(tmp_path / "train/good/train_0000.png")
    assert len(np.unique(np.round(x * 65535))) > 256


def test_both_layouts_resolve_to_the_same_roles(tmp_path):
    _small(tmp_path / "m", "mvtec")
    _small(tmp_path / "r", "roles")
    m, r = load_dataset(tmp_path / "m"), load_dataset(tmp_path / "r")
    assert (m.layout, r.layout) == ("mvtec", "roles")
    assert m.summary() == r.summary() == {"train": 4, "validation": 2, "anomaly": len(DEFECTS), "temp": 0}
    assert {s.defect for s in m.anomalies} == {s.defect for s in r.anomalies} == set(DEFECTS)
    assert all(s.mask is not None for s in m.anomalies + r.anomalies)


def test_hidden_and_nas_folders_are_not_defect_types(tmp_path):
    import shutil

    from cellscan.core.data import folder_images

    root = tmp_path / "cells"
    generate(root, size=16, n_train=4, n_test_good=2, n_per_defect=1, seed=0)
    before = load_dataset(root)
    some = before.validation[0].path
    for junk in ("test/.thumbs", "test/@eaDir", "train/good/@eaDir"):
        (root / junk).mkdir(parents=True)
        shutil.copy(some, root / junk / "c.png")
    shutil.copy(some, root / "test" / "good" / "._c.png")  # macOS resource fork beside the image
    after = load_dataset(root)
    assert {s.defect for s in after.anomalies} == {s.defect for s in before.anomalies}
    assert (len(after.anomalies), len(after.validation)) == (len(before.anomalies), len(before.validation))
    assert folder_images(root / "train") == folder_images(root / "train" / "good") == before.train
    from cellscan.core.images import canonical_png
    from cellscan.serve.intake import DatasetIndex

    digest = canonical_png(some.read_bytes())[1]  # the duplicate check names the image, not a thumbnail
    assert DatasetIndex(root, 10**8).find(digest) == some


def test_mapping_is_defined_once():
    assert folder_for("mvtec", "anomaly", "void") == "test/void"
    assert folder_for("roles", "validation") == "validation"
    assert set(ROLE_FOLDERS) == {"train", "validation", "anomaly", "temp"}
    with pytest.raises(DatasetError, match="unknown role"):
        folder_for("mvtec", "testing")


def test_unknown_layout_is_explained(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="expected train/good"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_holdout_split_is_seeded_and_disjoint(tmp_path):
    _small(tmp_path)
    ds = load_dataset(tmp_path)
    fit, hold = ds.split_train(0.25, seed=1)
    assert set(fit).isdisjoint(hold) and len(fit) + len(hold) == 4
    assert ds.split_train(0.25, seed=1) == (fit, hold)
