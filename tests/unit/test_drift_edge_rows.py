"""Edge devices' rows in the prediction log (a score and a verdict, no descriptors) do not break the drift report."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellscan.core.config import load_params
from cellscan.mlops.monitor.drift import COLUMNS, EMBEDDING, run_report, with_pixels
from tests.conftest import REPO


def _frame(rng: np.random.Generator, n: int, shift: float = 0.0) -> pd.DataFrame:
    d = {c: rng.normal(shift, 1, n) for c in (*COLUMNS, *EMBEDDING)}
    d["score"] = rng.normal(0, 1, n)
    d["is_anomaly"] = (d["score"] > 2).astype(float)
    return pd.DataFrame(d)


def test_edge_rows_are_left_out_and_drift_is_still_found():
    p = load_params(REPO / "params.yaml").monitor
    rng = np.random.default_rng(0)
    ref = _frame(rng, 200)
    edge = _frame(rng, 80)
    edge[[*COLUMNS, *EMBEDDING]] = np.nan
    same = pd.concat([_frame(rng, 100), edge], ignore_index=True)
    assert len(with_pixels(same)) == 100
    _, res = run_report(ref, same, p)
    assert not res.drift and res.n_current == 100
    shifted = pd.concat([edge, _frame(rng, 100, shift=1.5)], ignore_index=True)
    _, res = run_report(ref, shifted, p)
    assert res.drift and res.n_current == 100


def test_old_stamped_reports_are_pruned_and_the_latest_stays(tmp_path):
    from cellscan.mlops.monitor.drift import prune_reports

    for day in range(1, 6):
        for suffix in (".html", ".json"):
            (tmp_path / f"report-202612{day:02d}T000000Z{suffix}").write_text("r")
    (tmp_path / "latest.html").write_text("l")
    (tmp_path / "latest.json").write_text("l")
    assert prune_reports(tmp_path, keep=2) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.html", "latest.json", "report-20261204T000000Z.html", "report-20261204T000000Z.json",
        "report-20261205T000000Z.html", "report-20261205T000000Z.json"]
    assert prune_reports(tmp_path, keep=2) == 0
