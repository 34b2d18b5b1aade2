"""The champion/challenger decision, as a pure function of metrics (no registry, no I/O).

A challenger is promoted when there is no champion to compare with, or when none of the metrics
the gate lists is worse than the champion's by more than the tolerance. Both sets of metrics must
come from the same evaluation data. A metric that is missing or not finite (NaN, inf) on the
challenger's side fails the gate; one the champion lacks (or has as NaN) cannot be compared and
is skipped, and the reason says so; when nothing at all can be compared the challenger is not
promoted (promote it by hand if wanted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from cellscan.core.config import GateParams


@dataclass(frozen=True)
class GateDecision:
    """The outcome of one comparison: ``promoted`` and a one-line ``reason`` for people."""

    promoted: bool
    reason: str
    worse: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    compared: dict[str, tuple[float, float | None]] = field(default_factory=dict)


def _value(metrics: Mapping[str, float], name: str) -> float | None:
    v = metrics.get(name)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def decide(
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, rule: GateParams
) -> GateDecision:
    """Decide whether the challenger replaces the champion.

    Args:
        challenger: the new version's metrics.
        champion: the champion's metrics on the same data, or None when there is no champion.
        rule: the metrics to compare (higher is better) and the tolerance.

    Returns:
        The decision; ties (equal metrics) promote the challenger.
    """
    names = rule.names
    if champion is None:
        compared = {m: (v, None) for m in names if (v := _value(challenger, m)) is not None}
        return GateDecision(True, "no champion yet", compared=compared)
    worse: list[str] = []
    skipped: list[str] = []
    compared: dict[str, tuple[float, float | None]] = {}
    for m in names:
        new, old = _value(challenger, m), _value(champion, m)
        if old is None:
            skipped.append(m)
            continue
        if new is None:
            worse.append(f"{m} missing or not finite (champion {old:.4f})")
            continue
        compared[m] = (new, old)
        if new < old - rule.tolerance:
            worse.append(f"{m} {new:.4f} < champion {old:.4f}")
    tol = f" (tolerance {rule.tolerance:g})" if rule.tolerance else ""
    if worse:
        return GateDecision(False, "worse: " + "; ".join(worse) + tol, tuple(worse), tuple(skipped), compared)
    if not compared:
        reason = "nothing to compare (champion has no finite " + ", ".join(skipped) + "): stays challenger"
        return GateDecision(False, reason, (), tuple(skipped), compared)
    reason = "not worse on " + ", ".join(compared) + tol
    if skipped:
        reason += "; not compared: " + ", ".join(skipped)
    return GateDecision(True, reason, (), tuple(skipped), compared)
