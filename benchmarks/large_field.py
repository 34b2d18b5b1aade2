"""Larger images, same pixels: do the patch and texture views keep small defects when the field grows?

Builds 2 x 2 mosaics of a category's tiles in a temporary folder (never in the repo; the shared images'
licences are research-only): each training tile once, each normal test mosaic four different normal
test tiles, each defect mosaic one defect tile among three normal ones, every tile at the category's
working size. A 256-pixel set becomes a 512-pixel one at the same pixel pitch (a larger field of view,
as a cast part or a whole cell is beside one weld tile). Then fits each view on the mosaics' fitting
images, as training does, at the fixed side (``score.view_scale: 0``: 128 pixels, a quarter of the
working size) and at the default (half of it), and prints and writes image AUROC and seconds.
``--keep DIR`` keeps the mosaics (as ``DIR/mosaic/<category>``) for ``benchmarks/detection.py --root DIR``
to train the whole product on them.

    python benchmarks/large_field.py [--category gdxray_welds/weld_radiograph] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import detection  # noqa: E402  (the product's defaults per category, the shared root)
from cellscan.core.data import load_dataset  # noqa: E402
from cellscan.core.images import load_batch, load_image, save_png  # noqa: E402
from cellscan.core.scoring import PatchView, TextureView  # noqa: E402
from cellscan.core.train import working_shape  # noqa: E402


def build_mosaics(category: Path, out: Path, seed: int = 0) -> Path:
    """2 x 2 mosaics of ``category`` (MVTec layout) under ``out``; returns the new category folder."""
    rng = np.random.default_rng(seed)
    ds = load_dataset(category)
    shape = working_shape(ds.train, detection.params_for(category))  # tiles of other sizes brought to it
    good = [s.path for s in ds.evaluation if s.label == 0]
    bad = [s.path for s in ds.evaluation if s.label == 1]
    read = lambda p: load_image(p, size=shape, channels=1)[..., 0]  # noqa: E731
    dst = out / "mosaic" / category.name

    def save(paths: list[Path], path: Path) -> None:
        t = [read(p) for p in paths]
        # 16-bit: 16-bit tiles kept as they are, 8-bit ones exactly too (v / 255 is v * 257 / 65535)
        save_png(np.block([[t[0], t[1]], [t[2], t[3]]]), path, bit_depth=16)

    train = [ds.train[i] for i in rng.permutation(len(ds.train))]
    for k in range(len(train) // 4):
        save(train[4 * k : 4 * k + 4], dst / "train" / "good" / f"m{k:04d}.png")
    for k in range(len(good)):
        picks = rng.choice(len(good), 4, replace=False)
        save([good[i] for i in picks], dst / "test" / "good" / f"g{k:04d}.png")
    for k, path in enumerate(bad):
        tiles = [good[i] for i in rng.choice(len(good), 3, replace=False)]
        tiles.insert(int(rng.integers(0, 4)), path)
        save(tiles, dst / "test" / "defect" / f"d{k:04d}.png")
    return dst


def views_alone(category: Path) -> dict[str, dict[str, float]]:
    """Each view fitted as training fits it, at the fixed side and at the default: image AUROC, seconds."""
    from sklearn.metrics import roc_auc_score

    p = detection.params_for(category)
    ds = load_dataset(category)
    fit_paths, _ = ds.split_train(p.data.val_fraction, p.base.seed)
    shape = working_shape(ds.train, p)
    x_fit = load_batch(fit_paths, size=shape, channels=p.data.channels)
    x = load_batch([s.path for s in ds.evaluation], size=shape, channels=p.data.channels)
    labels = np.array([s.label for s in ds.evaluation])
    out: dict[str, dict[str, float]] = {}
    views = (("patch", PatchView, p.score.patch_side), ("texture", TextureView, p.score.texture_side))
    for name, cls, side in views:
        for setting, s in (("fixed", side), ("default", p.score.view_side(side, shape))):
            t0 = time.perf_counter()
            view = cls.fit(x_fit, s)
            t1 = time.perf_counter()
            scores = view.scores(x)
            t2 = time.perf_counter()
            auroc = round(float(roc_auc_score(labels, scores)), 4)
            out[f"{name}_{setting}"] = {"side": s, "image_auroc": auroc, "fit_seconds": round(t1 - t0, 1),
                                        "score_seconds_per_image": round((t2 - t1) / len(x), 4)}
            print(f"{category.name:16s} {shape} {name:8s} side {s:4d}  image AUROC {auroc:.3f}"
                  f"  fit {t1 - t0:5.1f} s  score {(t2 - t1) / len(x):.3f} s/image", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=detection.DEFAULT_ROOT)
    ap.add_argument("--category", default="gdxray_welds/weld_radiograph")
    ap.add_argument("--keep", type=Path, default=None, help="keep the mosaics under this folder")
    ap.add_argument("--out", type=Path, default=None, help="default: results/large_field_<category>.json")
    a = ap.parse_args()
    src = a.root / a.category
    if not (src / "train" / "good").is_dir():
        raise SystemExit(f"{src}: no train/good (the shared datasets are read from --root)")
    with tempfile.TemporaryDirectory() as tmp:
        base = a.keep or Path(tmp)
        result = {"category": a.category, "tiles": "2 x 2", "views": views_alone(build_mosaics(src, base))}
    out = a.out or HERE / "results" / f"large_field_{src.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
