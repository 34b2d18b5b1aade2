"""Detection benchmark: cellscan against simple peers on every category of a dataset root.

For every category (a folder with train/good and test/) under the root, each method trains on
train/good and is scored on test/good + test/<defect> (the same split for all):

- cellscan: the product's autoencoder (simulated anomalies, SSIM + L2 maps, per-pixel standardisation)
- pca: PCA reconstruction error on 32x32 pixels
- iforest: IsolationForest on 16x16 pixels (image scores only)
- plain_ae: the original design's autoencoder (same network, MSE loss, mean error, no tuning)

Prints a table (image AUROC, pixel AUROC where masks exist, training seconds) and writes JSON.

    python benchmarks/detection.py [--root ../shared/datasets] [--out benchmarks/results/detection.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest

from cellscan.core.config import Params
from cellscan.core.data import Dataset, load_dataset
from cellscan.core.evaluate import evaluate_model, pixel_auroc
from cellscan.core.images import load_batch, load_mask, resize
from metrics_table import format_table
from cellscan.core.train import train

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "datasets"
METHODS = ("cellscan", "pca", "iforest", "plain_ae")


def categories(root: Path) -> list[Path]:
    return sorted(p.parent.parent for p in root.glob("*/*/train/good") if p.is_dir())


def params_for(category: Path, max_epochs: int) -> Params:
    """Image size and flips per dataset: digits are small and oriented, radiographs and tiles are not."""
    digits = category.parent.name == "mnist"
    size = 32 if digits else 64
    return Params().with_overrides(
        {
            "data.image_size": size,
            "train.flip": not digits,
            "train.epochs": max_epochs,
            "train.patience": 5,
            "train.batch_size": 32,
        }
    )


def plain_params(p: Params) -> Params:
    return p.with_overrides(
        {
            "train.ssim_weight": 0.0,
            "train.augment": False,
            "train.anomaly_prob": 0.0,
            "score.map": "l2",
            "score.aggregation": "mean",
            "score.smooth_sigma": 0.0,
            "score.normalize": False,
        }
    )


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def run_ae(p: Params, ds: Dataset) -> dict[str, float]:
    res = train(p, ds)
    return {
        "image_auroc": res.evaluation.metrics["image_auroc"],
        "pixel_auroc": res.evaluation.metrics.get("pixel_auroc", float("nan")),
        "train_seconds": res.seconds,
        "epochs": res.epochs,
    }


def run_shallow(method: str, ds: Dataset, p: Params, x_train: np.ndarray) -> dict[str, float]:
    samples = ds.evaluation
    side = 32 if method == "pca" else 16
    xt = np.stack([resize(a, side) for a in x_train]).reshape(len(x_train), -1)
    xe_full = load_batch([s.path for s in samples], size=p.data.image_size, channels=1)
    xe = np.stack([resize(a, side) for a in xe_full]).reshape(len(xe_full), -1)
    labels = np.array([s.label for s in samples])
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    if method == "pca":
        model = PCA(n_components=0.95, random_state=0).fit(xt)
        seconds = time.perf_counter() - t0
        rec = model.inverse_transform(model.transform(xe))
        err = (xe - rec) ** 2
        scores = err.mean(axis=1)
        if ds.has_masks:
            maps = np.stack([resize(e.reshape(side, side, 1), p.data.image_size)[..., 0] for e in err])
            masks = np.stack([load_mask(s.mask, p.data.image_size) for s in samples])
            out["pixel_auroc"] = pixel_auroc(maps, masks)
    else:
        model = IsolationForest(n_estimators=200, random_state=0).fit(xt)
        seconds = time.perf_counter() - t0
        scores = -model.score_samples(xe)
    out |= {"image_auroc": _auroc(labels, scores), "train_seconds": seconds}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "detection.json")
    ap.add_argument("--only", nargs="*", default=None, help="category names to run (default: all)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=30, help="maximum epochs (early stopping ends sooner)")
    ap.add_argument("--max-train", type=int, default=1000, help="cap on training images per category")
    args = ap.parse_args(argv)

    if not args.root.is_dir():
        print(f"dataset root {args.root} is absent: nothing to benchmark (skipped)")
        return 0
    cats = [c for c in categories(args.root) if not args.only or c.name in args.only]
    results: dict[str, dict[str, dict[str, float]]] = {}
    if args.out.is_file():  # resume: keep categories already measured
        results = json.loads(args.out.read_text()).get("results", {})
    for cat in cats:
        key = f"{cat.parent.name}/{cat.name}"
        if key in results and all(m in results[key] for m in args.methods):
            continue
        ds = load_dataset(cat)
        ds.train = ds.train[: args.max_train]
        p = params_for(cat, args.epochs)
        x_train = load_batch(ds.train, size=p.data.image_size, channels=1)
        row: dict[str, dict[str, float]] = results.get(key, {})
        for m in args.methods:
            t0 = time.perf_counter()
            if m == "cellscan":
                row[m] = run_ae(p, ds)
            elif m == "plain_ae":
                row[m] = run_ae(plain_params(p), ds)
            else:
                row[m] = run_shallow(m, ds, p, x_train)
            print(f"{key:32s} {m:9s} image AUROC {row[m]['image_auroc']:.3f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
        results[key] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"root": str(args.root), "results": results}, indent=2))
    print()
    print(format_table(results, args.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
