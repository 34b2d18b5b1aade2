"""The champion/challenger decision: a pure function of two sets of metrics and the gate params."""

from __future__ import annotations

import math

import pytest

from cellscan.core.config import GateParams
from cellscan.mlops.gate import decide

RULE = GateParams(metrics="image_auroc,f1", tolerance=0.0)
CHAMP = {"image_auroc": 0.90, "f1": 0.80, "precision": 0.7}


def test_no_champion_promotes():
    d = decide({"image_auroc": 0.1, "f1": 0.1}, None, RULE)
    assert d.promoted and d.reason == "no champion yet"


def test_better_on_every_metric_promotes():
    d = decide({"image_auroc": 0.95, "f1": 0.85}, CHAMP, RULE)
    assert d.promoted and d.reason == "not worse on image_auroc, f1"
    assert d.compared == {"image_auroc": (0.95, 0.90), "f1": (0.85, 0.80)}


def test_tie_promotes():
    d = decide(dict(CHAMP), CHAMP, RULE)
    assert d.promoted and not d.worse


@pytest.mark.parametrize("metric", ["image_auroc", "f1"])
def test_worse_on_any_listed_metric_rejects(metric):
    new = dict(CHAMP) | {metric: CHAMP[metric] - 0.01}
    d = decide(new, CHAMP, RULE)
    assert not d.promoted
    assert d.reason.startswith(f"worse: {metric} {new[metric]:.4f} < champion {CHAMP[metric]:.4f}")
    assert len(d.worse) == 1


def test_worse_on_both_lists_both():
    d = decide({"image_auroc": 0.5, "f1": 0.5}, CHAMP, RULE)
    assert not d.promoted and len(d.worse) == 2 and "image_auroc" in d.reason and "f1" in d.reason


def test_unlisted_metric_is_ignored():
    d = decide(dict(CHAMP) | {"precision": 0.0}, CHAMP, RULE)
    assert d.promoted


def test_listed_metric_decides_when_listed():
    rule = GateParams(metrics="precision", tolerance=0.0)
    assert not decide(dict(CHAMP) | {"precision": 0.0}, CHAMP, rule).promoted
    assert decide(dict(CHAMP) | {"precision": 0.7}, CHAMP, rule).promoted


def test_tolerance_allows_a_small_drop_only():
    rule = GateParams(metrics="image_auroc,f1", tolerance=0.05)
    assert decide({"image_auroc": 0.86, "f1": 0.76}, CHAMP, rule).promoted
    d = decide({"image_auroc": 0.84, "f1": 0.80}, CHAMP, rule)
    assert not d.promoted and "tolerance 0.05" in d.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "x"])
def test_challenger_nan_or_missing_fails(bad):
    new = {"image_auroc": 0.99, "f1": bad} if bad is not None else {"image_auroc": 0.99}
    d = decide(new, CHAMP, RULE)
    assert not d.promoted and "f1 missing or not finite" in d.reason


def test_champion_nan_metric_is_skipped_not_compared():
    d = decide({"image_auroc": 0.95, "f1": 0.1}, {"image_auroc": 0.9, "f1": math.nan}, RULE)
    assert d.promoted and d.skipped == ("f1",) and "not compared: f1" in d.reason


def test_nothing_comparable_stays_challenger():
    d = decide({"image_auroc": 0.95, "f1": 0.9}, {"image_auroc": math.nan}, RULE)
    assert not d.promoted and "nothing to compare" in d.reason


def test_both_nan_is_not_a_promotion():
    d = decide({"image_auroc": math.nan, "f1": math.nan}, {"image_auroc": math.nan, "f1": math.nan}, RULE)
    assert not d.promoted


def test_without_known_anomalies_no_model_is_promoted_on_f1():
    """Validation normals only (no anomaly/ yet): F1 0 against F1 0 is no evidence; the champion stays."""
    import numpy as np

    from cellscan.core.evaluate import image_metrics

    normals = np.zeros(6)
    good = image_metrics(normals, np.full(6, 0.1), threshold=1.0)
    bad = image_metrics(normals, np.full(6, 9.0), threshold=1.0)  # flags every normal
    assert math.isnan(bad["f1"])
    assert math.isnan(bad["image_auroc"])
    d = decide(bad, good, GateParams())
    assert not d.promoted, d.reason
    assert "stays challenger" in d.reason
