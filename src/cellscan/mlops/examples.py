"""A labelled examples image for a run: the highest- and lowest-scoring images with their verdicts.

Each tile shows input, reconstruction (when the model has one) and the heatmap overlay, upscaled so
a person can read it, under a caption: file name, truth, score and verdict against the threshold.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from cellscan.core.bundle import CellscanModel
    from cellscan.core.evaluate import Evaluation

TILE = 192
CAPTION = 40


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _rgb(a: np.ndarray, tw: int) -> Image.Image:
    a = np.asarray(a, np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    img = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    return img.resize((tw, TILE), Image.Resampling.NEAREST)


def pick(ev: Evaluation, n: int = 6) -> list[int]:
    """Up to n images: the highest scores first, then the lowest (no duplicates)."""
    order = list(np.argsort(-np.asarray(ev.scores)))
    top, bottom = order[: (n + 1) // 2], order[::-1][: n // 2]
    return list(dict.fromkeys(int(i) for i in top + bottom))


def examples_png(model: CellscanModel, ev: Evaluation, n: int = 6) -> bytes:
    """One row per picked image: input | reconstruction | heatmap, captioned."""
    from cellscan.core.plots import overlay

    idx = pick(ev, n)
    if not idx:
        msg = "no evaluated images"
        raise ValueError(msg)
    x = np.stack([model.load(ev.paths[i]) for i in idx])  # each image the way the model reads it
    res = model.score_arrays(x)
    recon = getattr(res, "recon", None)
    cols = 3 if recon is not None else 2
    tw = int(np.clip(round(TILE * x.shape[2] / x.shape[1]), 96, 2 * TILE))
    font, small = _font(16), _font(13)
    sheet = Image.new("RGB", (max(cols * tw, 480), len(idx) * (TILE + CAPTION) + 24), "white")
    draw = ImageDraw.Draw(sheet)
    head = "input | reconstruction | anomaly map" if cols == 3 else "input | anomaly map"
    draw.text((6, 4), f"{head}   (threshold {model.threshold:.4g})", fill="black", font=small)
    for row, i in enumerate(idx):
        y = 24 + row * (TILE + CAPTION)
        score = float(res.scores[row])
        anomalous = score > model.threshold
        truth = ev.defects[i] if ev.labels[i] == 1 else "normal"
        verdict = "ANOMALY" if anomalous else "normal"
        colour = (200, 0, 0) if anomalous else (0, 120, 0)
        draw.text((6, y + 2), f"{Path(ev.paths[i]).name}", fill="black", font=font)
        draw.text((6, y + 21), f"truth {truth}   score {score:.4g}   ->  {verdict}", fill=colour, font=small)
        tiles = [_rgb(x[row], tw)]
        if recon is not None:
            tiles.append(_rgb(recon[row], tw))
        tiles.append(_rgb(overlay(x[row], res.maps[row], model.threshold) / 255.0, tw))
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (c * tw, y + CAPTION))
        draw.rectangle([0, y + CAPTION, cols * tw - 1, y + CAPTION + TILE - 1], outline=colour, width=3)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
