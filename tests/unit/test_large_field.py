"""benchmarks/large_field.py: the 2 x 2 mosaics it builds from a set's tiles."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import large_field  # noqa: E402
from cellscan.core.data import load_dataset  # noqa: E402
from cellscan.core.images import load_image  # noqa: E402


def test_mosaics_hold_each_training_tile_once_and_one_defect_tile_per_defect_mosaic(dataset_dir, tmp_path):
    ds = load_dataset(dataset_dir)
    tile = load_image(ds.train[0], channels=1)
    h, w = tile.shape[:2]
    out = large_field.build_mosaics(dataset_dir, tmp_path)
    mosaics = load_dataset(out)
    n_good = sum(s.label == 0 for s in ds.evaluation)
    defects = [s.path for s in ds.evaluation if s.label == 1]
    assert len(mosaics.train) == len(ds.train) // 4
    assert sum(s.label == 0 for s in mosaics.evaluation) == n_good
    assert sum(s.label == 1 for s in mosaics.evaluation) == len(defects)
    first = load_image(sorted((out / "test" / "defect").glob("*.png"))[0], channels=1)[..., 0]
    assert first.shape == (2 * h, 2 * w)
    quadrants = [first[y : y + h, x : x + w] for y in (0, h) for x in (0, w)]
    defect = load_image(defects[0], channels=1)[..., 0]
    same = [np.abs(q - defect).max() < 1e-4 for q in quadrants]
    assert sum(same) == 1  # the defect tile, once, among normal ones
    tiles = np.stack([load_image(p, channels=1)[..., 0] for p in ds.train])
    quads = [load_image(p, channels=1)[..., 0] for p in sorted((out / "train" / "good").glob("*.png"))]
    found = []
    for q in quads:
        for y in (0, h):
            for x in (0, w):
                off = np.abs(tiles - q[y : y + h, x : x + w]).reshape(len(tiles), -1).max(axis=1)
                assert off.min() < 1e-4  # a training tile as it was (16-bit kept 16-bit)
                found.append(int(off.argmin()))
    assert len(set(found)) == len(found)  # none twice
