"""Evaluation plots as PNG bytes: ROC curve and score histograms (matplotlib, headless)."""

from __future__ import annotations

import io

import numpy as np

from cellscan.evaluate import Evaluation, roc_points


def _png(fig: object) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buf.getvalue()


def roc_png(ev: Evaluation) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if len(np.unique(ev.labels)) == 2:
        pts = roc_points(ev.labels, ev.scores)
        ax.plot(pts["fpr"], pts["tpr"], label=f"AUROC {ev.metrics['image_auroc']:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image ROC")
    ax.legend(loc="lower right")
    return _png(fig)


def histogram_png(ev: Evaluation) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.linspace(float(ev.scores.min()), float(ev.scores.max()) + 1e-9, 30)
    ax.hist(ev.scores[ev.labels == 0], bins=bins, alpha=0.6, label="normal")
    if (ev.labels == 1).any():
        ax.hist(ev.scores[ev.labels == 1], bins=bins, alpha=0.6, label="anomaly")
    ax.axvline(ev.threshold, color="k", ls="--", label="threshold")
    ax.set(xlabel="reconstruction_error (image score)", ylabel="images", title="score distribution")
    ax.legend()
    return _png(fig)
