"""Plain-text tables of benchmark results (category x method)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(results: dict[str, dict[str, dict[str, float]]], methods: Sequence[str],
                 mean_over_all: bool = True) -> str:
    """Rows per category; per method image AUROC, pixel AUROC and training seconds; the best image AUROC starred.

    Only categories that every shown method has are averaged (unless ``mean_over_all``).
    """
    head = ["category"] + [f"{m} img/px/s" for m in methods]
    lines = [head]
    for cat, row in results.items():
        best = max((row[m]["image_auroc"] for m in methods if m in row), default=float("nan"))
        cells = [cat]
        for m in methods:
            r = row.get(m)
            if r is None:
                cells.append("n/a")
                continue
            star = "*" if r["image_auroc"] == best else " "
            cells.append(
                f"{_fmt(r['image_auroc'])}{star} {_fmt(r.get('pixel_auroc'))} {r.get('train_seconds', 0):.0f}s"
            )
        lines.append(cells)
    means = ["mean image AUROC"]
    common = [row for row in results.values() if mean_over_all or all(m in row for m in methods)]
    for m in methods:
        vals = [row[m]["image_auroc"] for row in common if m in row]
        means.append(_fmt(sum(vals) / len(vals)) if vals else "-")
    lines.append(means)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines)
