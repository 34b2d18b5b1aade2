"""The drift detector on a project's champion: false alarms on windows of pure normals, and how many
images of a shift it takes to flag it.

    python -m benchmarks.drift_detector --project DIR [--windows 20] [--out benchmarks/results/drift_detector.md]

Normal windows are fresh synthetic slices (other seeds than the project's data) at the project's size;
shifted windows are the same slices made brighter, lower in contrast or blurred. Each window goes through
:func:`cellscan.mlops.monitor.drift.run_report` against the champion's reference, exactly as the monitor does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cellscan.core.config import load_params
from cellscan.core.images import load_image, save_png
from cellscan.core.synth import generate
from cellscan.mlops import registry
from cellscan.mlops.monitor.drift import run_report
from cellscan.mlops.monitor.reference import frame_for, load_reference
from cellscan.settings import Settings, setup_offline

SHIFTS = {
    "none": lambda x: x,
    "brightness +0.05": lambda x: np.clip(x + 0.05, 0, 1),
    "brightness +0.15": lambda x: np.clip(x + 0.15, 0, 1),
    "contrast x0.8": lambda x: np.clip(0.5 + 0.8 * (x - 0.5), 0, 1),
    "blur 3x3": lambda x: sum(np.roll(x, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9,
}


def pool(model, size: int, n: int, shift, work: Path, seed: int) -> object:  # type: ignore[no-untyped-def]
    raw = work / f"raw-{seed}"
    generate(raw, size=size, n_train=2, n_test_good=n, n_per_defect=0, seed=seed)
    out = work / f"img-{seed}-{abs(hash(shift)) % 10**6}"
    out.mkdir()
    for p in sorted((raw / "test" / "good").glob("*.png")):
        save_png(shift(load_image(p)[..., 0]), out / p.name, 16)
    return frame_for(model, sorted(out.glob("*.png")))


def main(project: Path, windows: int, sizes: list[int], out: Path | None) -> str:
    setup_offline()
    settings = Settings.from_env(project)
    params = load_params(project / "params.yaml")
    model, version = registry.load_model("champion", settings)
    ref = load_reference(settings, version)  # type: ignore[arg-type]
    size = max(model.shape)
    lines = [f"Drift detector, champion v{version} of {project} (reference: {len(ref)} validation normals), "
             f"p_value {params.monitor.p_value}, drift_share {params.monitor.drift_share}, "
             f"embedding_share {params.monitor.embedding_share}, rate_z {params.monitor.rate_z}", "",
             "| stream | window | windows | flagged (drift or rate jump) | most drifted columns |", "|---|---|---|---|---|"]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in SHIFTS.items():
            n = windows if name == "none" else min(windows, 5)
            frames = pool(model, size, n * max(sizes), fn, Path(tmp), seed=900)
            for w in sizes:
                flagged, cols = 0, {}
                for k in range(n):
                    cur = frames.iloc[k * w: (k + 1) * w] if (k + 1) * w <= len(frames) else frames.sample(w, random_state=k)
                    _, r = run_report(ref, cur, params.monitor, version)
                    flagged += r.drift or r.rate_jump
                    for c in r.drifted:
                        cols[c] = cols.get(c, 0) + 1
                top = ", ".join(c for c, _ in sorted(cols.items(), key=lambda kv: -kv[1])[:4])
                lines.append(f"| {name} | {w} | {n} | {flagged}/{n} | {top} |")
                print(lines[-1], flush=True)
    lines += ["", f"({time.time() - t0:.0f} s)"]
    text = "\n".join(lines)
    if out:
        out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--sizes", default="10,20,40")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    print(main(a.project, a.windows, [int(s) for s in a.sizes.split(",")], a.out))
