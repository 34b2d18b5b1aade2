"""Fusion variants from saved part scores, without retraining: the image AUROC of each part and of several ways
to combine them, per category and on average.

    python benchmarks/fusion_variants.py ['/tmp/cellscan-fusion/models/*/part_scores.npz']

Reads the ``part_scores.npz`` files that ``benchmarks/fusion_parts.py`` saves beside each cached model (test
scores with labels, and the same parts on the normal training hold-out). Each part is standardised on the
hold-out only (``z``: mean and spread; ``logz``: the same on logs; ``robz``: median and 1.4826 MAD), then
combined by ``sum``, ``max``, ``sq`` (sum of squared positive parts), ``lse`` (log-sum-exp) or ``fisher``
(sum of -log Gaussian tail probabilities). No test label is used except to compute the AUROC.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable

import numpy as np
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

PARTS = ("recon", "head", "glob")
Standardise = Callable[[np.ndarray, np.ndarray], np.ndarray]


def z(v: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (v - ref.mean()) / max(float(ref.std()), 1e-9)


def logz(v: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return z(np.log(np.maximum(v, 0) + 1e-6), np.log(np.maximum(ref, 0) + 1e-6))


def robz(v: np.ndarray, ref: np.ndarray) -> np.ndarray:
    med = np.median(ref)
    return (v - med) / max(float(1.4826 * np.median(np.abs(ref - med))), 1e-9)


COMBINE: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "sum": lambda zs: np.sum(zs, axis=0),
    "max": lambda zs: np.max(zs, axis=0),
    "sq": lambda zs: np.sum([np.clip(v, 0, None) ** 2 for v in zs], axis=0),
    "lse": lambda zs: np.log(np.sum([np.exp(np.clip(v, -50, 50)) for v in zs], axis=0)),
    "fisher": lambda zs: np.sum([-norm.logsf(v) for v in zs], axis=0),
}


def variants(path: str) -> dict[str, float]:
    d = np.load(path)
    y = d["labels"]
    out = {k: float(roc_auc_score(y, d[k])) for k in PARTS}
    for sname, std in (("z", z), ("logz", logz), ("robz", robz)):
        zs = [std(d[k], d[k + "_hold"]) for k in PARTS]
        for cname, combine in COMBINE.items():
            out[f"{cname}_{sname}"] = float(roc_auc_score(y, combine(zs)))
    return out


def main() -> None:
    pattern = sys.argv[1] if len(sys.argv) > 1 else "/tmp/cellscan-fusion/models/*/part_scores.npz"
    rows = [(p.split("/")[-2], variants(p)) for p in sorted(glob.glob(pattern))]
    if not rows:
        raise SystemExit(f"no part_scores.npz matches {pattern}; run benchmarks/fusion_parts.py first")
    print("variant".ljust(12), " ".join(n[:12].rjust(12) for n, _ in rows), "    mean")
    for key in rows[0][1]:
        vals = [r[key] for _, r in rows]
        print(key.ljust(12), " ".join(f"{v:12.3f}" for v in vals), f"   {np.mean(vals):.3f}")


if __name__ == "__main__":
    main()
