"""Detection benchmark: cellscan against simple peers on every category of a dataset root.

For every category (a folder with train/good and test/) under the root, each method trains on
train/good and is scored on test/good + test/<defect> (the same split for all):

- cellscan: the product at its defaults (params.yaml): native resolution, reconstruction network and
  discriminative head trained on simulated anomalies, plus the whole-image view (PCA residual at 16 px),
  fused score; nothing set per dataset
- pca: PCA reconstruction error on 32x32 pixels
- iforest: IsolationForest on 16x16 pixels (image scores only)
- plain_ae: the original design's autoencoder (64x64, conv encoder, dense bottleneck, MSE, mean error)
- before: cellscan's figures before this change (benchmarks/results/detection_before.json), not re-run

Ablations (--ablation) train cellscan twice more on each category: the native-resolution reconstruction
network alone (no head), the head at a fixed 64x64 working size, and the networks without the whole-image view. --seeds N repeats cellscan with N seeds
on the categories given by --seed-only.

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

from cellscan.core.bundle import CellscanModel
from cellscan.core.config import Params, load_params
from cellscan.core.data import Dataset, load_dataset
from cellscan.core.evaluate import evaluate_model, pixel_auroc
from cellscan.core.images import load_batch, load_mask, resize
from metrics_table import format_table
from cellscan.core.train import train

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "datasets"
METHODS = ("cellscan", "pca", "iforest", "plain_ae")
BEFORE = HERE / "results" / "detection_before.json"


def machine() -> dict[str, object]:
    """Where the figures were made: the networks' training repeats bit for bit on one machine, not across CPUs
    (the same code trained 40 epochs on one and stopped by patience after 31 on another)."""
    import platform

    import keras
    import tensorflow as tf

    cpu = platform.processor()
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}


def categories(root: Path) -> list[Path]:
    return sorted(p.parent.parent for p in root.glob("*/*/train/good") if p.is_dir())


def params_for(category: Path, max_seconds: int | None = None, seed: int = 42, epochs: int | None = None) -> Params:
    """The product's defaults (params.yaml): the same for every category (budget overrides aside)."""
    p = load_params(HERE.parent / "params.yaml")
    over: dict[str, object] = {"base.seed": seed}
    if max_seconds:
        over["train.max_seconds"] = max_seconds
    if epochs:
        over["train.epochs"] = epochs
    return p.with_overrides(over)


ABLATIONS: dict[str, dict[str, object]] = {
    "native_recon_only": {"model.head_filters": 0, "score.fusion": "recon"},
    "head_at_64px": {"data.image_size": 64},
    "no_global_view": {"score.global_side": 0},
    "no_patch_view": {"score.patch_side": 0},
    "no_texture_view": {"score.texture_side": 0},
}


def plain_ae(ds: Dataset, size: int = 64, epochs: int = 30, seed: int = 0) -> dict[str, float]:
    """The original design's autoencoder: 64x64 input, conv encoder, dense bottleneck, MSE, mean error."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    x = load_batch(ds.train, size=size, channels=1)
    inp = keras.Input((size, size, 1))
    h = inp
    for f in (32, 64, 128):
        h = layers.Conv2D(f, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Dense(128)(layers.Flatten()(h))
    h = layers.Reshape((size // 8, size // 8, 128))(layers.Dense((size // 8) ** 2 * 128, activation="relu")(h))
    for f in (128, 64, 32):
        h = layers.Conv2DTranspose(f, 3, strides=2, padding="same", activation="relu")(h)
    net = keras.Model(inp, layers.Conv2D(1, 3, padding="same", activation="sigmoid")(h))
    net.compile("adam", "mse")
    t0 = time.perf_counter()
    net.fit(x, x, epochs=epochs, batch_size=32, validation_split=0.15, verbose=0,
            callbacks=[keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True)])
    seconds = time.perf_counter() - t0
    samples = ds.evaluation
    xe = load_batch([s.path for s in samples], size=size, channels=1)
    err = (xe - net.predict(xe, verbose=0)) ** 2
    labels = np.array([s.label for s in samples])
    out = {"image_auroc": _auroc(labels, err.mean(axis=(1, 2, 3))), "train_seconds": seconds}
    if ds.has_masks:
        out["pixel_auroc"] = pixel_auroc(err[..., 0], np.stack([load_mask(s.mask, size) for s in samples]))
    return out


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def score_parts(model: CellscanModel, ds: Dataset) -> dict[str, float]:
    """Image and pixel AUROC of each part alone: reconstruction, head, each image view (one forward pass);
    the fused score with one vote per view (``view_weights: equal``) and the views' separations."""
    from cellscan.core.scoring import VIEWS, aggregate, fuse

    samples = ds.evaluation
    labels = np.array([s.label for s in samples])
    x = load_batch([s.path for s in samples], size=model.shape, channels=model.channels)
    p = model.score_params
    parts = [model._parts(x[i : i + 32], p) for i in range(0, len(x), 32)]
    rmap = np.concatenate([m for _, m, _ in parts])
    out = {"recon_image_auroc": _auroc(labels, aggregate(rmap, p.aggregation, p.topk))}
    masks = np.stack([load_mask(s.mask, model.shape) for s in samples]) if ds.has_masks else None
    if masks is not None:
        out["recon_pixel_auroc"] = pixel_auroc(rmap, masks)
    if parts[0][2] is not None:
        hmap = np.concatenate([h for _, _, h in parts])
        out["head_image_auroc"] = _auroc(labels, hmap.reshape(len(hmap), -1).max(axis=1))
        if masks is not None:
            out["head_pixel_auroc"] = pixel_auroc(hmap, masks)
    views = {name: getattr(model, f"{name}_view") for name in VIEWS}
    vscores = {name: None if view is None else view.scores(x) for name, view in views.items()}
    for name, v in vscores.items():
        if v is not None:
            out[f"{name}_image_auroc"] = _auroc(labels, v)
    if "separation" in model.meta.get("fusion", {}):  # the same parts, one vote per view (view_weights: equal)
        hmap = None if parts[0][2] is None else np.concatenate([h for _, _, h in parts])
        equal, _ = fuse(aggregate(rmap, p.aggregation, p.topk), rmap, hmap, p.fusion, model.meta["fusion"],
                        vscores["global"], vscores["patch"], p.network_weight, vscores["texture"], False)
        out["equal_weights_image_auroc"] = _auroc(labels, equal)
        out["view_separation"] = model.meta["fusion"]["separation"]
    t0 = time.perf_counter()  # everything /predict does after decoding: networks, maps, views, fusion
    model.score_arrays(x[:64])
    out["score_seconds_per_image"] = (time.perf_counter() - t0) / len(x[:64])
    return out


def run_cellscan(p: Params, ds: Dataset) -> dict[str, float]:
    res = train(p, ds)
    meta = res.model.meta
    return score_parts(res.model, ds) | {
        "image_auroc": res.evaluation.metrics["image_auroc"],
        "pixel_auroc": res.evaluation.metrics.get("pixel_auroc", float("nan")),
        "by_area": res.evaluation.by_area(),
        "train_seconds": res.seconds,
        "epochs": res.epochs,
        "n_params": meta.get("n_params", 0),
        "train_images_per_s": meta.get("train_images_per_s", 0),
        "input_shape": meta.get("input_shape"),
        "stopped_by": meta.get("stopped_by", ""),
    }


def run_shallow(method: str, ds: Dataset, x_train: np.ndarray, size: int = 64) -> dict[str, float]:
    samples = ds.evaluation
    side = 32 if method == "pca" else 16
    xt = np.stack([resize(a, side) for a in x_train]).reshape(len(x_train), -1)
    xe_full = load_batch([s.path for s in samples], size=size, channels=1)
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
            maps = np.stack([resize(e.reshape(side, side, 1), size)[..., 0] for e in err])
            masks = np.stack([load_mask(s.mask, size) for s in samples])
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
    ap.add_argument("--max-seconds", type=int, default=None, help="override train.max_seconds (default: params.yaml)")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: params.yaml)")
    ap.add_argument("--max-train", type=int, default=0, help="cap on training images per category (0: all)")
    ap.add_argument("--ablation", action="store_true", help="also train the ablation variants")
    ap.add_argument("--seeds", type=int, default=1, help="cellscan runs with seeds 42, 43, ...")
    ap.add_argument("--seed-only", nargs="*", default=["weld_radiograph"], help="categories that get --seeds")
    args = ap.parse_args(argv)

    if not args.root.is_dir():
        print(f"dataset root {args.root} is absent: nothing to benchmark (skipped)")
        return 0
    cats = [c for c in categories(args.root) if not args.only or c.name in args.only]
    results: dict[str, dict[str, dict[str, object]]] = {}
    if args.out.is_file():  # resume: keep what was measured already
        results = json.loads(args.out.read_text()).get("results", {})
    before = json.loads(BEFORE.read_text())["results"] if BEFORE.is_file() else {}
    for cat in cats:
        key = f"{cat.parent.name}/{cat.name}"
        ds = load_dataset(cat)
        if args.max_train:
            ds.train = ds.train[: args.max_train]
        row = results.get(key, {})
        todo: list[tuple[str, Params | None]] = [(m, None) for m in args.methods]
        if args.ablation:
            base = params_for(cat, args.max_seconds, epochs=args.epochs)
            todo += [(name, base.with_overrides(o)) for name, o in ABLATIONS.items()]
        if args.seeds > 1 and cat.name in args.seed_only:
            todo += [(f"cellscan_seed{s}", params_for(cat, args.max_seconds, s, args.epochs)) for s in range(43, 42 + args.seeds)]
        for name, p in todo:
            if name in row:
                continue
            t0 = time.perf_counter()
            if name == "cellscan":
                row[name] = run_cellscan(params_for(cat, args.max_seconds, epochs=args.epochs), ds)
            elif p is not None:
                row[name] = run_cellscan(p, ds)
            elif name == "plain_ae":
                row[name] = plain_ae(ds)
            else:
                row[name] = run_shallow(name, ds, load_batch(ds.train, size=64, channels=1))
            print(f"{key:32s} {name:18s} image AUROC {row[name]['image_auroc']:.3f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
            results[key] = row
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"root": str(args.root), "machine": machine(), "results": results},
                                           indent=2))
        if key in before and "cellscan" in before[key]:
            row["before"] = before[key]["cellscan"]
    print()
    shown = {k: v for k, v in results.items() if not args.only or k.split("/")[1] in args.only}
    extra = sorted({m for r in shown.values() for m in r} - set(METHODS) - {"before"})
    print(format_table(shown, [*METHODS, "before"]))
    if extra:
        print()
        print(format_table(shown, ["cellscan", *extra], mean_over_all=False))
    sizes = format_by_area(shown)
    if sizes:
        print()
        print(sizes)
    return 0


def format_by_area(results: dict[str, dict[str, dict[str, object]]]) -> str:
    """cellscan's image AUROC by defect size (marked pixels at the working size) where the set has masks:
    one line per category, each band as ``pixels: AUROC (defects)``."""
    lines = []
    for key, row in results.items():
        bands = row.get("cellscan", {}).get("by_area") or {}
        if bands:
            cells = "  ".join(f"{b}: {m['image_auroc']:.3f} ({m['n']})" for b, m in bands.items())
            lines.append(f"{key:32s} {cells}")
    return "cellscan image AUROC by defect size, marked pixels (defects)\n" + "\n".join(lines) if lines else ""


if __name__ == "__main__":
    sys.exit(main())
