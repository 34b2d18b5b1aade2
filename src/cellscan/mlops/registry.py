"""The MLflow model registry: load any model reference, list versions, move the champion alias, lineage.

Every version is the pyfunc ``model`` of one run, and holds exactly one model bundle (the directory
``CellscanModel.save`` writes; see :mod:`cellscan.mlops.pyfunc`). Its metrics, threshold, data
hash and params live in that run; the version itself carries only what the gate decided
(``cellscan.gate``, ``cellscan.compared_with``, ``cellscan.champion_metrics``) and a description
with the gate's reason. The alias ``champion`` marks the serving version; a version the gate
rejects gets ``challenger``. Rollback reads the registry itself, so alias moves made in the
MLflow UI count too.
"""

from __future__ import annotations

import calendar
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellscan.core.bundle import CellscanModel
from cellscan.errors import ConfigError, RegistryError
from cellscan.mlops.tracking import client
from cellscan.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from mlflow.tracking import MlflowClient

    from cellscan.mlops.gate import GateDecision

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
GATE_TAG, COMPARED_TAG, CHAMP_METRICS_TAG = "cellscan.gate", "cellscan.compared_with", "cellscan.champion_metrics"
WAS_CHAMPION_TAG, ROLLED_BACK_TAG = "cellscan.was_champion", "cellscan.rolled_back"

__all__ = ["CHAMPION", "CHALLENGER", "client", "load_model", "champion_version", "list_versions", "promote",
           "rollback", "previous_champion", "apply_decision", "written_decision", "lineage"]


# -- references -------------------------------------------------------------------------------
# What a store answers for a model, version or alias it does not hold (sqlite and REST alike); any other
# MlflowException (a server that does not answer, a database error) goes to the caller as it is.
_ABSENT_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def not_found(exc: Exception) -> bool:
    """Whether an MlflowException says the model, version, alias or artifact asked for does not exist."""
    return getattr(exc, "error_code", None) in _ABSENT_CODES


def _aliases(mc: MlflowClient, name: str) -> dict[str, int]:
    from mlflow.exceptions import MlflowException

    try:
        rm = mc.get_registered_model(name)
    except MlflowException as exc:
        if not not_found(exc):  # an unreachable store is not "no champion" (the gate would promote blind)
            raise
        return {}
    return {alias: int(v) for alias, v in (rm.aliases or {}).items()}


def champion_version(settings: Settings) -> int | None:
    return _aliases(client(settings), settings.model_name).get(CHAMPION)


def serving_since(settings: Settings) -> float | None:
    """When the champion took the alias, at the latest: the newest alias move cellscan recorded (a version
    taking it, through the gate, a promotion or a rollback, or seen leaving it). A move made only in the
    MLflow UI records nothing, so the champion took the alias after that; None where no move is recorded."""
    mc = client(settings)
    newest = None
    for mv in mc.search_model_versions(f"name='{settings.model_name}'"):
        try:
            stamp = time.strptime((mv.tags or {})[WAS_CHAMPION_TAG].split(" ", 1)[0], "%Y-%m-%dT%H:%M:%SZ")
        except (KeyError, ValueError):
            continue
        newest = max(newest or 0.0, float(calendar.timegm(stamp)))
    return newest


def _resolve(mc: MlflowClient, name: str, ref: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    if isinstance(ref, str) and ref.startswith("models:/"):  # the form `predict -m` takes, for every command
        other, ref = parse_ref(ref)  # type: ignore[assignment]
        if other != name:
            msg = f"model reference names {other!r}; this registry's model is {name!r}"
            raise RegistryError(msg)
    try:
        if isinstance(ref, int) or str(ref).isdigit():
            return mc.get_model_version(name, str(ref))
        return mc.get_model_version_by_alias(name, str(ref))
    except MlflowException as exc:
        if not not_found(exc):  # MLflow down or failing: its own error, not "no such version"
            raise
        msg = f"model {name!r} has no version or alias {ref!r}"
        raise RegistryError(msg) from None


def parse_ref(ref: int | str | Path) -> tuple[str | None, int | str | Path]:
    """Split a reference into (model name or None, version / alias / directory)."""
    if isinstance(ref, int | Path):
        return None, ref
    if ref.startswith("models:/"):
        body = ref.removeprefix("models:/")
        name, sep, alias = body.partition("@")
        if not sep:
            name, _, alias = body.partition("/")
        if not name or not alias:
            msg = f"model reference {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
            raise ConfigError(msg)
        return name, int(alias) if alias.isdigit() else alias
    if ref.isdigit():
        return None, int(ref)
    if "/" in ref or Path(ref).is_dir():
        return None, Path(ref)
    return None, ref


def load_model(
    ref: int | str | Path = CHAMPION, settings: Settings | None = None
) -> tuple[CellscanModel, int | None]:
    """Load a model from anywhere: (model, registry version or None for a directory).

    ``ref`` is a bundle directory, ``models:/<name>@<alias>``, ``models:/<name>/<N>``, a version
    number or an alias (``champion``). Registry references need ``settings``.

    Raises:
        ModelError: the directory or the version's artifact is not a cellscan bundle.
        RegistryError: no such version or alias.
    """
    name, what = parse_ref(ref)  # type: ignore[arg-type]
    if isinstance(what, Path):
        return CellscanModel.load_dir(what), None
    if settings is None:
        msg = f"loading {ref!r} from the registry needs settings (tracking URI)"
        raise ConfigError(msg)
    from cellscan.mlops.pyfunc import load_bundle

    name = name or settings.model_name
    mc = client(settings)
    mv = _resolve(mc, name, what)
    model = load_bundle(f"models:/{name}/{mv.version}")
    model.meta["registry_version"] = int(mv.version)
    return model, int(mv.version)


# -- listing and lineage ----------------------------------------------------------------------
def _run(mc: MlflowClient, run_id: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return mc.get_run(run_id)
    except MlflowException:
        return None


def list_versions(settings: Settings) -> list[dict[str, Any]]:
    """Every version, newest first: aliases, kind, threshold, metrics, data hash, gate (read from its run)."""
    mc = client(settings)
    name = settings.model_name
    by_version: dict[int, list[str]] = {}
    for alias, v in _aliases(mc, name).items():
        by_version.setdefault(v, []).append(alias)
    rows = []
    for mv in mc.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        run = _run(mc, mv.run_id)
        metrics = dict(run.data.metrics) if run else {}
        rtags = dict(run.data.tags) if run else {}
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(by_version.get(int(mv.version), [])),
            "kind": rtags.get("cellscan.kind", tags.get("kind", "")),
            "threshold": float(metrics.get("threshold", tags.get("threshold", "nan"))),
            "image_auroc": float(metrics.get("image_auroc", "nan")),
            "f1": float(metrics.get("f1", "nan")),
            "data_hash": rtags.get("data_hash", tags.get("data_hash", "")),
            "gate": tags.get(GATE_TAG, tags.get("gate", "")),
            "run_id": mv.run_id,
            "run_name": run.info.run_name if run else "",
            "created": int(mv.creation_timestamp or 0),
        })
    return sorted(rows, key=lambda r: -r["version"])


def lineage(settings: Settings, ref: int | str) -> dict[str, Any]:
    """Everything recorded about one version: run, data, code, params, metrics, the gate's comparison."""
    from cellscan.mlops.tracking import run_summary

    mc = client(settings)
    name = settings.model_name
    mv = _resolve(mc, name, ref)
    tags = mv.tags or {}
    run = run_summary(settings, mv.run_id) if mv.run_id else {}
    champ_metrics = json.loads(tags.get(CHAMP_METRICS_TAG, "null") or "null")
    aliases = [a for a, v in _aliases(mc, name).items() if v == int(mv.version)]
    return {
        "version": int(mv.version), "aliases": sorted(aliases), "description": mv.description or "",
        "run_id": mv.run_id, "run_name": run.get("run_name"),
        "kind": run.get("tags", {}).get("cellscan.kind"),
        "finetuned_from": run.get("tags", {}).get("cellscan.finetuned_from"),
        "data_hash": run.get("tags", {}).get("data_hash"),
        "git_commit": run.get("tags", {}).get("git_commit"),
        "datasets": run.get("datasets", []),
        "duration_s": ((run.get("end_time") or 0) - (run.get("start_time") or 0)) / 1000 if run else None,
        "params": run.get("params", {}), "metrics": run.get("metrics", {}),
        "gate": tags.get(GATE_TAG, ""), "compared_with": tags.get(COMPARED_TAG),
        "champion_metrics": champ_metrics,
    }


# -- moving aliases ---------------------------------------------------------------------------
def _stamp(how: str) -> str:
    return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {how}"


def _mark_was_champion(mc: MlflowClient, name: str, version: int | None, how: str) -> None:
    """Remember that ``version`` has served (whoever put it there: the gate, a person, the UI)."""
    if version is not None:
        mc.set_model_version_tag(name, str(version), WAS_CHAMPION_TAG, _stamp(how))


def _set_champion(mc: MlflowClient, name: str, version: int, how: str) -> int | None:
    previous = _aliases(mc, name).get(CHAMPION)
    if previous == version:  # already serving: no move, no new stamp (serving_since)
        return previous
    _mark_was_champion(mc, name, previous, "was champion (seen when the alias moved)")
    mc.set_registered_model_alias(name, CHAMPION, str(version))
    _mark_was_champion(mc, name, version, how)
    if _aliases(mc, name).get(CHALLENGER) == version:
        mc.delete_registered_model_alias(name, CHALLENGER)
    logger.info("champion: version %s -> %s (%s)", previous, version, how)
    return previous


def promote(settings: Settings, version: int | str, reason: str = "manual",
            ready: Callable[[int], object] | None = None) -> int | None:
    """Make ``version`` (a number, an alias or models:/ reference) the champion; returns the previous one.
    ``ready(version)`` runs first, as for :func:`rollback`: where it raises, nothing is written."""
    mc = client(settings)
    name = settings.model_name
    version = int(_resolve(mc, name, version).version)
    if _aliases(mc, name).get(CHAMPION) == version:
        return version
    if ready is not None:
        ready(version)
    mv = mc.get_model_version(name, str(version))
    if ROLLED_BACK_TAG in (mv.tags or {}):
        mc.delete_model_version_tag(name, str(version), ROLLED_BACK_TAG)
    return _set_champion(mc, name, version, f"promoted: {reason}")


def previous_champion(settings: Settings) -> int | None:
    """The version a rollback returns to: the newest version below the champion that served or passed
    the gate and was not rolled back from. Derived from the registry, so UI alias moves count."""
    mc = client(settings)
    name = settings.model_name
    current = _aliases(mc, name).get(CHAMPION)
    if current is None:
        return None
    best = None
    for mv in mc.search_model_versions(f"name='{name}'"):
        v, tags = int(mv.version), mv.tags or {}
        if v >= current or ROLLED_BACK_TAG in tags:
            continue
        served = WAS_CHAMPION_TAG in tags or tags.get(GATE_TAG, "").startswith("promoted")
        if served and (best is None or v > best):
            best = v
    return best


def rollback(settings: Settings, version: int | str | None = None,
             ready: Callable[[int], object] | None = None) -> int:
    """Move ``champion`` back: to ``version``, or without one to :func:`previous_champion`.

    ``ready(version)`` runs before anything is written (loading the version, say): where it raises, the
    alias and the tags stay as they were and its exception goes to the caller.

    Raises:
        RegistryError: there is no earlier champion, or the version does not exist.
    """
    mc = client(settings)
    name = settings.model_name
    current = _aliases(mc, name).get(CHAMPION)
    if version is None:
        version = previous_champion(settings)
        if version is None:
            msg = f"no previous champion of {name!r} to roll back to (current: {current})"
            raise RegistryError(msg)
    version = int(_resolve(mc, name, version).version)
    if ready is not None:
        ready(version)
    if current is not None and version < current:  # going back: the newer one is not a candidate again
        mc.set_model_version_tag(name, str(current), ROLLED_BACK_TAG, _stamp(f"rolled back to {version}"))
    mv = mc.get_model_version(name, str(version))
    if ROLLED_BACK_TAG in (mv.tags or {}):
        mc.delete_model_version_tag(name, str(version), ROLLED_BACK_TAG)
    _set_champion(mc, name, version, f"rollback from {current}")
    return version


def written_decision(settings: Settings, version: int) -> dict[str, Any] | None:
    """The gate decision already written for ``version`` with its alias in place (promoted: it is the
    champion; rejected: the challenger), as :func:`cellscan.mlops.steps.gate` returns it; None where none
    was written or the write stopped before the alias moved (the gate must then run)."""
    mc = client(settings)
    name = settings.model_name
    tags = mc.get_model_version(name, str(version)).tags or {}
    verdict, _, reason = tags.get(GATE_TAG, "").partition(": ")
    alias = {"promoted": CHAMPION, "rejected": CHALLENGER}.get(verdict)
    if alias is None or _aliases(mc, name).get(alias) != version:
        return None
    compared = tags.get(COMPARED_TAG, "none")
    return {"promoted": verdict == "promoted", "reason": reason,
            "champion": int(compared) if compared.isdigit() else None,
            "champion_metrics": json.loads(tags.get(CHAMP_METRICS_TAG, "null") or "null") or {}}


def _v(version: int | None) -> str:
    return f"version {version}" if version is not None else "none"


def apply_decision(
    settings: Settings, version: int, decision: GateDecision, champion: int | None,
    champion_metrics: dict[str, float] | None, run_name: str | None = None,
) -> GateDecision:
    """Write a gate decision: tags and description on the version, then the aliases; returns the decision
    as written.

    ``champion`` is the version the decision compared with; where the alias has moved since (an
    operator's rollback while this version was scored), the version is not promoted over the new one.
    """
    mc = client(settings)
    name = settings.model_name
    now = _aliases(mc, name).get(CHAMPION)
    if decision.promoted and now != champion:  # a rollback or another run moved it meanwhile: theirs stands
        decision = replace(decision, promoted=False, reason=(
            f"the champion moved from {_v(champion)} to {_v(now)} while this version was evaluated; "
            "not promoted over it (promote it by hand, or train again to compare with the new champion)"))
    verdict = "promoted" if decision.promoted else "rejected"
    mc.set_model_version_tag(name, str(version), GATE_TAG, f"{verdict}: {decision.reason}")
    mc.set_model_version_tag(name, str(version), COMPARED_TAG, str(champion) if champion is not None else "none")
    if champion_metrics is not None:
        mc.set_model_version_tag(name, str(version), CHAMP_METRICS_TAG, json.dumps(champion_metrics)[:5000])
    against = f"compared with champion version {champion}" if champion is not None else "first champion"
    desc = f"{run_name or 'run'}: {verdict} by the gate ({against}): {decision.reason}"
    mc.update_model_version(name, str(version), description=desc)
    if decision.promoted:
        _set_champion(mc, name, version, f"promoted: {decision.reason}")
    else:
        mc.set_registered_model_alias(name, CHALLENGER, str(version))
        logger.warning("version %d stays challenger: %s", version, decision.reason)
    return decision
