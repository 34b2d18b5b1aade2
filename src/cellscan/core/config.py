"""Typed parameters loaded from params.yaml (what changes results; environment settings live in cellscan.settings).

Every stage reads its own group (``base``, ``data``, ``synth``, ``model``, ``train``, ``score``)
into a frozen dataclass whose ``__post_init__`` checks ranges, so a bad value fails at load time
with a message naming the key, the allowed range and the value found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from cellscan.errors import ConfigError

MapKind = Literal["l2", "ssim", "l2_ssim"]
Aggregation = Literal["mean", "max", "topk_mean"]
MAP_KINDS: tuple[str, ...] = ("l2", "ssim", "l2_ssim")
AGGREGATIONS: tuple[str, ...] = ("mean", "max", "topk_mean")
Fusion = Literal["views", "sum", "head", "recon"]
FUSIONS: tuple[str, ...] = ("views", "sum", "head", "recon")
ViewWeights = Literal["simulated", "equal"]
VIEW_WEIGHTS: tuple[str, ...] = ("simulated", "equal")


def _check(cond: bool, key: str, expected: str, got: object) -> None:
    if not cond:
        msg = f"params: {key} must be {expected}, got {got!r}"
        raise ConfigError(msg)


# A 5-field cron expression as Prefect's schedules take it: each field a list of *, a number, a range or
# either with a /step; names for months and weekdays; within each field's range (weekday 7 is Sunday too).
# Checked here so that a wrong one is said when params.yaml is read, not when deployments are made.
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("weekday", 0, 7))
_CRON_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(),
               4: "sun mon tue wed thu fri sat".split()}


def cron_problem(expr: str) -> str | None:
    """What is wrong with the cron expression ``expr``, or None where Prefect would accept it."""
    fields = expr.split()
    if len(fields) != 5:
        return f"5 fields (minute hour day-of-month month weekday), not {len(fields)}"
    for i, (field_, (what, lo, hi)) in enumerate(zip(fields, _CRON_FIELDS, strict=True)):
        names = _CRON_NAMES.get(i, [])

        def value(tok: str, names: list[str] = names, lo: int = lo) -> int | None:
            if tok.lower() in names:
                return names.index(tok.lower()) + (lo if len(names) == 12 else 0)
            return int(tok) if tok.isdigit() else None

        for item in field_.split(","):
            rng, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                return f"a step of 1 or more in the {what} field ({item!r} is not)"
            any_ = rng == "*" or (rng == "?" and i in (2, 4))  # ? : any day, as croniter reads it
            ends = [lo, hi] if any_ else [value(t) for t in rng.split("-", 1)]  # dec-jan wraps round there
            if any(v is None for v in ends) or not all(lo <= v <= hi for v in ends if v is not None):
                return f"the {what} field within {lo}-{hi} ({item!r} is not)"
    return None


@dataclass(frozen=True)
class BaseParams:
    seed: int = 42

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "base.seed", "between 0 and 4294967295", self.seed)


@dataclass(frozen=True)
class DataParams:
    root: str = "data/cells"
    image_size: int = 0  # 0: native (the training images' own size, long side capped at max_side)
    max_side: int = 512
    channels: int = 1
    val_fraction: float = 0.15
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        _check(self.image_size == 0 or 8 <= self.image_size <= 2048, "data.image_size",
               "0 (native) or between 8 and 2048", self.image_size)
        _check(16 <= self.max_side <= 4096, "data.max_side", "between 16 and 4096", self.max_side)
        _check(self.channels in (1, 3), "data.channels", "1 (grayscale) or 3 (RGB)", self.channels)
        _check(0.0 < self.val_fraction < 0.9, "data.val_fraction", "in (0, 0.9)", self.val_fraction)
        _check(self.max_pixels >= 64, "data.max_pixels", ">= 64", self.max_pixels)


@dataclass(frozen=True)
class SynthParams:
    size: int = 128
    n_train: int = 160
    n_test_good: int = 40
    n_per_defect: int = 10
    bit_depth: int = 16

    def __post_init__(self) -> None:
        _check(32 <= self.size <= 2048, "synth.size", "between 32 and 2048", self.size)
        _check(self.n_train >= 2, "synth.n_train", ">= 2", self.n_train)
        _check(self.n_test_good >= 1, "synth.n_test_good", ">= 1", self.n_test_good)
        _check(self.n_per_defect >= 0, "synth.n_per_defect", ">= 0", self.n_per_defect)
        _check(self.bit_depth in (8, 16), "synth.bit_depth", "8 or 16", self.bit_depth)


@dataclass(frozen=True)
class ModelParams:
    base_filters: int = 16
    depth: int = 3
    bottleneck: int = 16  # channels of the reconstruction network's narrowest feature map
    dropout: float = 0.1
    head_filters: int = 16  # discriminative head (0: reconstruction only)
    head_depth: int = 3

    def __post_init__(self) -> None:
        _check(4 <= self.base_filters <= 256, "model.base_filters", "between 4 and 256", self.base_filters)
        _check(1 <= self.depth <= 6, "model.depth", "between 1 and 6", self.depth)
        _check(2 <= self.bottleneck <= 1024, "model.bottleneck", "between 2 and 1024", self.bottleneck)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "in [0, 1)", self.dropout)
        _check(self.head_filters == 0 or 4 <= self.head_filters <= 256, "model.head_filters",
               "0 (no head) or between 4 and 256", self.head_filters)
        _check(1 <= self.head_depth <= 6, "model.head_depth", "between 1 and 6", self.head_depth)

    @property
    def multiple(self) -> int:
        """Input sides must divide by this (the deepest stride of either network)."""
        return 2 ** max(self.depth, self.head_depth if self.head_filters else 0, 1)


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 1e-3
    patience: int = 8
    augment: bool = True
    flip: bool = False
    anomaly_prob: float = 0.5
    ssim_weight: float = 0.5
    crop: int = 64  # side of the random training crops (capped at the working size)
    steps_per_epoch: int = 0  # 0: one crop per training image per epoch (at least 50 batches)
    max_seconds: int = 720  # training time budget; the best weights so far are kept
    head_weight: float = 1.0  # weight of the discriminative head's loss

    def __post_init__(self) -> None:
        _check(1 <= self.epochs <= 10_000, "train.epochs", "between 1 and 10000", self.epochs)
        _check(1 <= self.batch_size <= 4096, "train.batch_size", "between 1 and 4096", self.batch_size)
        _check(0.0 < self.learning_rate < 1.0, "train.learning_rate", "in (0, 1)", self.learning_rate)
        _check(self.patience >= 1, "train.patience", ">= 1", self.patience)
        _check(0.0 <= self.anomaly_prob <= 1.0, "train.anomaly_prob", "in [0, 1]", self.anomaly_prob)
        _check(0.0 <= self.ssim_weight <= 1.0, "train.ssim_weight", "in [0, 1]", self.ssim_weight)
        _check(8 <= self.crop <= 4096, "train.crop", "between 8 and 4096", self.crop)
        _check(0 <= self.steps_per_epoch <= 100_000, "train.steps_per_epoch", "between 0 and 100000",
               self.steps_per_epoch)
        _check(10 <= self.max_seconds <= 7 * 86400, "train.max_seconds", "between 10 and 604800", self.max_seconds)
        _check(0.0 <= self.head_weight <= 100.0, "train.head_weight", "in [0, 100]", self.head_weight)


@dataclass(frozen=True)
class ScoreParams:
    map: MapKind = "l2_ssim"
    aggregation: Aggregation = "topk_mean"
    topk: float = 0.02
    smooth_sigma: float = 2.0
    threshold_quantile: float = 0.99
    normalize: bool = True
    # image score: the network's two standardised scores averaged plus each image view (views), all parts
    # summed (sum, models trained before views), or one network part alone
    fusion: Fusion = "views"
    # views: the network's vote beside each image view's one where it is not measured (view_weights equal,
    # one image view, bundles saved before it was measured; bundles saved without it: 1)
    network_weight: float = 0.5
    head_sigma: float = 4.0  # gaussian smoothing of the head's map before its maximum is taken
    global_side: int = 16  # long side of the whole-image view whose PCA residual joins the sum (0 = off)
    patch_side: int = 128  # long side at which windows are compared with the normals' bank (0 = off)
    texture_side: int = 128  # long side at which local textures are compared with the normals' bank (0 = off)
    # patch and texture views: at least this share of the working long side (a larger image keeps its
    # views' pixels as fine as a 256-pixel one's); 0: at patch_side / texture_side whatever the size
    view_scale: float = 0.5
    # views: each part (image views and the network) weighted by how well it told simulated defects from
    # hold-out normals when the model was fitted (simulated), or one vote each (equal; bundles fitted
    # without it: equal)
    view_weights: ViewWeights = "simulated"
    # simulated: the separations are raised to this power before they are shared out (bundles saved before
    # it: 1, each part by its separation)
    separation_power: float = 2.0

    def __post_init__(self) -> None:
        _check(self.map in MAP_KINDS, "score.map", f"one of {', '.join(MAP_KINDS)}", self.map)
        _check(
            self.aggregation in AGGREGATIONS,
            "score.aggregation",
            f"one of {', '.join(AGGREGATIONS)}",
            self.aggregation,
        )
        _check(0.0 < self.topk <= 1.0, "score.topk", "in (0, 1]", self.topk)
        _check(0.0 <= self.smooth_sigma <= 50.0, "score.smooth_sigma", "in [0, 50]", self.smooth_sigma)
        _check(
            0.5 <= self.threshold_quantile < 1.0,
            "score.threshold_quantile",
            "in [0.5, 1)",
            self.threshold_quantile,
        )
        _check(self.fusion in FUSIONS, "score.fusion", f"one of {', '.join(FUSIONS)}", self.fusion)
        _check(self.view_weights in VIEW_WEIGHTS, "score.view_weights", "simulated or equal", self.view_weights)
        _check(0.0 <= self.separation_power <= 8.0, "score.separation_power", "in [0, 8]", self.separation_power)
        _check(0.0 <= self.network_weight <= 10.0, "score.network_weight", "in [0, 10]", self.network_weight)
        _check(0.0 <= self.head_sigma <= 50.0, "score.head_sigma", "in [0, 50]", self.head_sigma)
        _check(0 <= self.global_side <= 256, "score.global_side", "in [0, 256]", self.global_side)
        patch_ok = self.patch_side == 0 or 16 <= self.patch_side <= 1024
        _check(patch_ok, "score.patch_side", "0 or in [16, 1024]", self.patch_side)
        texture_ok = self.texture_side == 0 or 16 <= self.texture_side <= 1024
        _check(texture_ok, "score.texture_side", "0 or in [16, 1024]", self.texture_side)
        _check(0.0 <= self.view_scale <= 1.0, "score.view_scale", "in [0, 1]", self.view_scale)

    def view_side(self, side: int, shape: tuple[int, ...]) -> int:
        """The long side a patch or texture view configured at ``side`` works at for images of ``shape``
        (H, W): ``side``, or ``view_scale`` of the long side where that is more; 0 when the view is off.

        Example:
            >>> p = ScoreParams()
            >>> p.view_side(128, (256, 256)), p.view_side(128, (512, 384)), p.view_side(0, (512, 512))
            (128, 256, 0)
        """
        return max(side, round(self.view_scale * max(shape[:2]))) if side else 0


GATE_METRICS: tuple[str, ...] = ("image_auroc", "image_aupr", "f1", "precision", "recall", "pixel_auroc")


@dataclass(frozen=True)
class GateParams:
    """Champion/challenger rule: promote when no listed metric is worse than the champion's by more than tolerance."""

    metrics: str = "image_auroc,f1"
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        names = self.names
        _check(bool(names), "gate.metrics", "a comma-separated list of metric names", self.metrics)
        bad = [n for n in names if n not in GATE_METRICS]
        _check(not bad, "gate.metrics", f"names from {', '.join(GATE_METRICS)}", self.metrics)
        _check(0.0 <= self.tolerance <= 1.0, "gate.tolerance", "in [0, 1]", self.tolerance)

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.metrics.split(",") if n.strip()]


@dataclass(frozen=True)
class RetrainParams:
    mode: str = "finetune"  # finetune from the champion's weights, or fresh
    epochs: int = 10
    cron: str = "0 2 * * *"  # nightly schedule of the retrain deployment

    def __post_init__(self) -> None:
        _check(self.mode in ("finetune", "fresh"), "retrain.mode", "finetune or fresh", self.mode)
        _check(1 <= self.epochs <= 10_000, "retrain.epochs", "between 1 and 10000", self.epochs)
        problem = cron_problem(self.cron)
        _check(problem is None, "retrain.cron", f"a cron expression with {problem}", self.cron)


@dataclass(frozen=True)
class MonitorParams:
    """The monitor flow: how often, on which window, and when drift or an anomaly-rate jump is called."""

    interval_minutes: int = 60  # schedule of the monitor deployment
    window: int = 200  # newest predictions of the champion compared with its reference
    min_samples: int = 30  # fewer: no report
    p_value: float = 0.01  # K-S p-value under which a column (descriptor, embedding component, score) drifted
    drift_share: float = 0.5  # descriptor drift when at least this share of descriptor columns drifted
    embedding_share: float = 0.5  # embedding drift when at least this share of its components drifted
    rate_z: float = 3.0  # anomaly-rate jump: rate above reference + z standard errors (+ 1/n)
    cooldown_minutes: int = 360  # no second retrain event inside this time

    def __post_init__(self) -> None:
        _check(1 <= self.interval_minutes <= 7 * 1440, "monitor.interval_minutes", "between 1 and 10080",
               self.interval_minutes)
        _check(self.window >= 10, "monitor.window", ">= 10", self.window)
        _check(2 <= self.min_samples <= self.window, "monitor.min_samples", "between 2 and monitor.window",
               self.min_samples)
        _check(0.0 < self.p_value < 0.5, "monitor.p_value", "in (0, 0.5)", self.p_value)
        _check(0.0 < self.drift_share <= 1.0, "monitor.drift_share", "in (0, 1]", self.drift_share)
        _check(0.0 < self.embedding_share <= 1.0, "monitor.embedding_share", "in (0, 1]", self.embedding_share)
        _check(0.0 <= self.rate_z <= 10.0, "monitor.rate_z", "in [0, 10]", self.rate_z)
        _check(0 <= self.cooldown_minutes <= 30 * 1440, "monitor.cooldown_minutes", "between 0 and 43200",
               self.cooldown_minutes)


@dataclass(frozen=True)
class Params:
    """All parameter groups of params.yaml."""

    base: BaseParams = field(default_factory=BaseParams)
    data: DataParams = field(default_factory=DataParams)
    synth: SynthParams = field(default_factory=SynthParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    score: ScoreParams = field(default_factory=ScoreParams)
    gate: GateParams = field(default_factory=GateParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    monitor: MonitorParams = field(default_factory=MonitorParams)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """Params as ``group.key`` pairs (for MLflow)."""
        return {f"{g}.{k}": v for g, group in self.to_dict().items() for k, v in group.items()}

    def with_overrides(self, overrides: dict[str, Any]) -> Params:
        """Return a copy with ``{"train.epochs": 3, ...}`` applied (values are checked again)."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            group, _, key = dotted.partition(".")
            if group not in raw or key not in raw[group]:
                msg = f"params: unknown key {dotted!r}; groups are {', '.join(raw)}"
                raise ConfigError(msg)
            raw[group][key] = value
        return params_from_dict(raw)


_GROUPS: dict[str, type] = {f.name: cast(type, f.default_factory) for f in fields(Params)}  # type: ignore[misc]


def _coerce(cls: type, name: str, raw: Any) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        msg = f"params: group {name!r} must be a mapping, got {type(raw).__name__}"
        raise ConfigError(msg)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        msg = f"params: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; expected {', '.join(known)}"
        raise ConfigError(msg)
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = getattr(defaults, key)
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
                values[key] = value
            elif isinstance(default, int):
                if isinstance(value, bool) or float(value) != int(value):
                    raise TypeError
                values[key] = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool):  # `true` is not 1.0 (gate.tolerance: true would open the gate)
                    raise TypeError
                values[key] = float(value)
            else:  # a word; an empty value (`-s data.root=`, `root:`) is not the folder "None"
                if value is None or isinstance(value, dict | list):
                    raise TypeError
                values[key] = str(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: .inf for an integer
            msg = f"params: {name}.{key} must be {type(default).__name__}, got {value!r}"
            raise ConfigError(msg) from None
    return replace(defaults, **values)


def params_from_dict(raw: dict[str, Any]) -> Params:
    unknown = sorted(set(raw) - set(_GROUPS))
    if unknown:
        msg = f"params: unknown group(s) {', '.join(unknown)}; expected {', '.join(_GROUPS)}"
        raise ConfigError(msg)
    return Params(**{name: _coerce(cls, name, raw.get(name)) for name, cls in _GROUPS.items()})


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load params.yaml into typed, range-checked groups.

    Args:
        path: the YAML file. Groups or keys it lacks take their defaults.
        overrides: ``{"group.key": value}`` applied after loading.

    Raises:
        ConfigError: the file is missing or a value is out of range.
    """
    p = Path(path)
    if not p.is_file():
        msg = f"params file does not exist: {p}"
        raise ConfigError(msg)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        msg = f"params file {p} is not valid YAML: {exc}"
        raise ConfigError(msg) from None
    params = params_from_dict(raw)
    return params.with_overrides(overrides) if overrides else params


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``["train.epochs=3", "score.map=ssim"]`` (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            msg = f"override must look like group.key=value, got {item!r}"
            raise ConfigError(msg)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            msg = f"override {item!r}: the value is not a YAML scalar ({str(exc).splitlines()[0]})"
            raise ConfigError(msg) from None
    return out
