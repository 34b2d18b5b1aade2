"""The ``cellscan`` command line: synth, train, evaluate, predict.

Errors of cellscan's own are caught here only: the command prints ``TypeName: message`` and exits 1.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from cellscan.core.config import load_params, parse_overrides
from cellscan.settings import setup_offline
from cellscan.errors import CellscanError, ConfigError, DatasetError, RegistryError, describe
from cellscan.files import swap_in

app = typer.Typer(help="cellscan: anomaly detection for CT/X-ray scans of battery cells.", no_args_is_help=True)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)
F = TypeVar("F", bound=Callable[..., Any])

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a param: group.key=value.")]
DataOpt = Annotated[Path | None, typer.Option("--data", "-d", help="Dataset folder (default: data.root).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Model directory, or models:/cellscan@champion (or /<version>).")
]


def _boundary(fn: F) -> F:
    """Turn cellscan's, MLflow's and the system's errors into one line and exit code 1 (:func:`describe`)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            said = describe(exc)  # cellscan's, MLflow's and the system's errors; anything else is a bug
            if said is None:
                raise
            console.print(f"[red]{said[0]}[/red]: {said[1]}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _output_file(path: Path | None, what: str) -> Path | None:
    """Check, before any work, that ``path`` can be written as a file (its folder made); a clear error if not."""
    if path is None:
        return None
    if path.is_dir():
        msg = f"{path} is a folder; expected a file path for the {what}"
        raise ConfigError(msg)
    _output_dir(path.parent, f"folder of the {what}")
    return path


def _output_dir(path: Path | None, what: str) -> Path | None:
    """Make ``path`` as a folder before any work; a clear error where it is a file or cannot be made."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        msg = f"{path} is a file; expected a folder for the {what}"
        raise ConfigError(msg)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot make the folder {path} for the {what}: {exc.strerror or exc}"
        raise ConfigError(msg) from None
    return path


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False) -> None:
    setup_offline()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _num(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, _num(v))
    return t


def _area_table(by_area: dict[str, dict[str, float]], shape: tuple[int, int]) -> Table:
    t = Table(title=f"by defect size (marked pixels at {shape[1]} x {shape[0]})")
    for name in ("pixels", "defects", "image AUROC", "recall"):
        t.add_column(name, justify="right")
    for band, m in by_area.items():
        t.add_row(band, str(m["n"]), _num(m["image_auroc"]), _num(m["recall"]))
    return t


def _dump(obj: Any) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    out.print_json(json.dumps(clean(obj)))


def _load_model(ref: str) -> Any:
    """A bundle directory, ``models:/<name>@<alias>``, ``models:/<name>/<version>``, a version or an alias."""
    from cellscan.mlops import registry

    model, _ = registry.load_model(ref, _store_settings(ref))
    return model


@app.command()
@_boundary
def synth(
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Dataset folder (default: data.root).")] = None,
    layout: Annotated[str, typer.Option(help="mvtec or roles.")] = "mvtec",
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a folder that already holds files.")] = False,
) -> None:
    """Generate synthetic CT slices of cylindrical cells, with defects and masks."""
    import shutil

    from cellscan.core.synth import generate

    p = load_params(params, parse_overrides(overrides or []))
    root = out_dir or Path(p.data.root)
    s = p.synth
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        msg = f"{root} is a {'link' if root.is_symlink() else 'file'}; expected a folder for the dataset"
        raise DatasetError(msg)
    replace = root.exists() and any(root.iterdir())  # writing into a dataset would mix old and new images
    if replace and not force:
        msg = f"{root} already holds files; choose an empty or new folder, or pass --force to replace it"
        raise DatasetError(msg)
    here = Path.cwd().resolve()
    if replace and (root.resolve() == here or root.resolve() in here.parents):  # --out . --force
        msg = f"{root} holds the current folder; expected a folder for the dataset (data/cells)"
        raise DatasetError(msg)
    target = root.with_name(f".{root.name}-synth") if replace else root  # the old set stays until the new is whole
    try:
        if replace:
            shutil.rmtree(target, ignore_errors=True)  # a half-written set left by an earlier failure
        with console.status(f"writing synthetic slices to {root}"):
            counts = generate(
                target, layout=layout, size=s.size, n_train=s.n_train, n_test_good=s.n_test_good,
                n_per_defect=s.n_per_defect, seed=p.base.seed, bit_depth=s.bit_depth,
            )
        if replace:
            swap_in(target, root)
    except OSError as exc:
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        msg = f"cannot write the dataset to {root}: {exc.strerror or exc}"
        raise DatasetError(msg) from None
    if as_json:
        _dump({"root": str(root), "counts": counts})
    else:
        out.print(_metrics_table(f"synthetic dataset {root}", counts))


class _EpochProgress:
    """A Keras callback showing a rich progress bar over epochs."""

    def __new__(cls, epochs: int) -> Any:
        import keras
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        class Bar(keras.callbacks.Callback):  # type: ignore[misc]
            def on_train_begin(self, logs: Any = None) -> None:
                self.progress = Progress(
                    TextColumn("training"), BarColumn(), TextColumn("epoch {task.completed}/{task.total}"),
                    TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), console=console, transient=True,
                )
                self.progress.start()
                self.task = self.progress.add_task("train", total=epochs, loss="")

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                logs = logs or {}
                loss = f"loss {logs.get('loss', float('nan')):.4f} val {logs.get('val_loss', float('nan')):.4f}"
                self.progress.update(self.task, advance=1, loss=loss)

            def on_train_end(self, logs: Any = None) -> None:
                self.progress.stop()

        return Bar()


@app.command()
@_boundary
def train(
    data: DataOpt = None,
    model_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write the model directory.")] = Path(
        "models/latest"
    ),
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    metrics_file: Annotated[Path | None, typer.Option("--metrics", help="Also write metrics JSON here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the autoencoder on normal images and calibrate its threshold."""
    from cellscan.core.train import train as run_train

    p = load_params(params, parse_overrides(overrides or []))
    _output_file(metrics_file, "metrics JSON")
    bar = [] if as_json or not sys.stderr.isatty() else [_EpochProgress(p.train.epochs)]
    res = run_train(p, data or Path(p.data.root), model_dir, callbacks=bar)
    summary = res.summary() | {"model_dir": str(model_dir)}
    if metrics_file:
        metrics_file.write_text(json.dumps(res.evaluation.metrics, indent=2))
    if as_json:
        _dump(summary | {"per_defect_auroc": res.evaluation.per_defect(), "by_area": res.evaluation.by_area()})
    else:
        out.print(_metrics_table(f"trained model -> {model_dir}", summary))


@app.command()
@_boundary
def evaluate(
    model_dir: ModelOpt = "models/latest",
    data: DataOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    calibrate: Annotated[bool, typer.Option(help="Recalibrate the threshold on this data.")] = False,
    metrics_file: Annotated[Path | None, typer.Option("--metrics", help="Also write metrics JSON here.")] = None,
    plots_dir: Annotated[Path | None, typer.Option("--plots", help="Write roc.csv and scores.csv here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score the validation normals and known anomalies; print image and pixel metrics."""
    from cellscan.core.data import load_dataset
    from cellscan.core.evaluate import evaluate_model

    p = load_params(params)
    _output_file(metrics_file, "metrics JSON")
    _output_dir(plots_dir, "plots")
    model = _load_model(model_dir)
    ds = load_dataset(data or Path(p.data.root))
    with console.status(f"scoring {len(ds.evaluation)} images"):
        ev = evaluate_model(model, ds, calibrate=calibrate, max_pixels=p.data.max_pixels)
    if metrics_file:
        metrics_file.write_text(json.dumps(ev.metrics, indent=2))
    if plots_dir:
        _write_plots(ev, plots_dir)
    per_defect = ev.per_defect() if ds.anomalies else {}
    by_area = ev.by_area()
    if as_json:
        _dump(ev.metrics | {"per_defect_auroc": per_defect, "by_area": by_area})
    else:
        out.print(_metrics_table(f"evaluation of {model_dir} on {ds.root}", ev.metrics))
        if per_defect:
            out.print(_metrics_table("image AUROC per defect type", per_defect))
        if by_area:
            out.print(_area_table(by_area, model.shape))


def _write_plots(ev: Any, folder: Path) -> None:
    """CSV files for ``dvc plots``: the ROC curve and every image's score."""
    import csv

    from cellscan.core.evaluate import roc_points

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "scores.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "defect", "label", "score"])
        for p, d, lab, sc in zip(ev.paths, ev.defects, ev.labels, ev.scores, strict=True):
            w.writerow([Path(p).name, d, int(lab), f"{sc:.6g}"])
    if len(set(ev.labels.tolist())) == 2:
        pts = roc_points(ev.labels, ev.scores)
        with (folder / "roc.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["fpr", "tpr"])
            w.writerows(zip(pts["fpr"], pts["tpr"], strict=True))


@app.command()
@_boundary
def prepare(
    data: DataOpt = None,
    manifest: Annotated[Path, typer.Option("--out", "-o", help="Manifest JSON to write.")] = Path(
        "runs/prepared.json"
    ),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Check every image of the dataset decodes, and write a manifest of roles and the hold-out split."""
    from cellscan.core.data import load_dataset
    from cellscan.core.images import load_image, load_mask

    p = load_params(params)
    ds = load_dataset(data or Path(p.data.root))
    paths = ds.train + [s.path for s in ds.evaluation] + ds.temp
    for path in paths:
        load_image(path, max_pixels=p.data.max_pixels)
    for sample in ds.evaluation:  # the ground-truth masks too: evaluate reads them
        load_mask(sample.mask, 8)
    fit, hold = ds.split_train(p.data.val_fraction, p.base.seed)
    body = {
        "root": str(ds.root), "layout": ds.layout, "counts": ds.summary(),
        "fit": [x.name for x in fit], "holdout": [x.name for x in hold],
        "defects": sorted({s.defect for s in ds.anomalies}),
    }
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(body, indent=2))
    out.print(_metrics_table(f"{ds.root} ({ds.layout} layout): {len(paths)} images decode", ds.summary()))


@app.command()
@_boundary
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to score.")],
    model_dir: ModelOpt = "models/latest",
    heatmaps: Annotated[Path | None, typer.Option(help="Write heatmap overlays (PNG) to this folder.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score images: is_anomaly, anomaly_score (what the threshold applies to), reconstruction_error.

    An image that cannot be read gets its error (and exit code 1); the others are scored all the same."""
    import numpy as np

    _output_dir(heatmaps, "heatmaps")
    model = _load_model(model_dir)
    rows: list[dict[str, Any]] = []
    loaded: list[tuple[int, Path, Any, Any]] = []  # (row, path, working-size input, the image at its own size)
    for path in images:
        try:
            x, native = model.load_pair(path)
        except (CellscanError, OSError) as exc:  # unreadable (a permission, a folder): its row says why
            said = describe(exc) or (type(exc).__name__, str(exc))
            rows.append({"image": str(path), "status": "error", "error": f"{said[0]}: {said[1]}"})
            continue
        loaded.append((len(rows), path, x, native))
        rows.append({"image": str(path), "status": "ok"})
    if loaded:
        res = model.score_arrays(np.stack([x for _, _, x, _ in loaded]))
        stems = [path.stem for _, path, _, _ in loaded]
        for j, (i, _, _, native) in enumerate(loaded):
            rows[i] |= res.record(j)
            if heatmaps:  # at the image's own size; a stem met twice gets its place among the scored
                from cellscan.core.plots import overlay_png

                stem = stems[j] if stems.count(stems[j]) == 1 else f"{stems[j]}_{j + 1}"
                (heatmaps / f"{stem}_heatmap.png").write_bytes(overlay_png(native, res.maps[j], model.threshold))
    failed = [r for r in rows if r["status"] == "error"]
    if as_json:
        _dump(rows)
    else:
        t = Table(title=f"predictions ({model_dir}, threshold {model.threshold:.4g} on anomaly_score)")
        for col in ("image", "anomaly_score", "reconstruction_error", "is_anomaly"):
            t.add_column(col, justify="right" if col != "image" else "left")
        for r in rows:
            if r["status"] == "error":
                t.add_row(r["image"], "-", "-", "[red]not scored[/red]")
                continue
            flag = "[red]ANOMALY[/red]" if r["is_anomaly"] else "[green]normal[/green]"
            t.add_row(r["image"], f"{r['anomaly_score']:.4g}", f"{r['reconstruction_error']:.4g}", flag)
        out.print(t)
    for r in failed:
        console.print(f"[red]{r['error'].split(':', 1)[0]}[/red]:{r['error'].split(':', 1)[1]}", highlight=False,
                      soft_wrap=True)
    if failed:
        raise typer.Exit(1)


models_app = typer.Typer(help="The MLflow model registry: versions, champion, rollback.", no_args_is_help=True)


@models_app.callback()
def _models(ctx: typer.Context) -> None:
    """A tracking server that does not answer is said in seconds, not after MLflow's minutes of retries; not
    for register and reproduce, whose upload or minutes of training one hiccup must not lose."""
    import os

    if ctx.invoked_subcommand in ("register", "reproduce"):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # each retry's warning: the one line below says it
app.add_typer(models_app, name="models")


def _settings() -> Any:
    from cellscan.settings import Settings

    return Settings.from_env()


def _store_settings(ref: str | None = None) -> Any:
    """The settings of a command that only reads the registry or moves its aliases (or reads ``ref`` where
    that is a registry reference, not a bundle directory): a sqlite store that does not exist is a mistyped
    URI, said here (in the command, so that its --help still answers)."""
    from cellscan.mlops import registry
    from cellscan.mlops.tracking import require_store

    settings = _settings()
    if ref is None or not isinstance(registry.parse_ref(ref)[1], Path):
        require_store(settings)
    return settings


@models_app.command("list")
@_boundary
def models_list(as_json: JsonOpt = False) -> None:
    """Registered versions with their aliases, metrics and data version."""
    from cellscan.mlops import registry

    rows = registry.list_versions(_store_settings())
    if as_json:
        _dump(rows)
        return
    t = Table(title=f"registered model {_settings().model_name} ({_settings().tracking_uri})")
    for col in ("version", "aliases", "run", "image_auroc", "f1", "threshold", "data_hash", "gate"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["version"]), ",".join(r["aliases"]), r["run_name"], _num(r["image_auroc"]), _num(r["f1"]),
                  _num(r["threshold"]), r["data_hash"][:12], r["gate"][:60])
    out.print(t)


def _loadable(settings: Any) -> Callable[[int], None]:
    """The check run before the champion alias moves: a version that cannot load leaves it where it is."""
    from cellscan.mlops import registry

    def check(v: int) -> None:
        try:
            registry.load_model(v, settings)
        except Exception as exc:
            msg = f"version {v} cannot be loaded ({type(exc).__name__}: {exc}); the champion is unchanged"
            raise RegistryError(msg) from None

    return check


@models_app.command("promote")
@_boundary
def models_promote(
    version: Annotated[str, typer.Argument(help="Version (a number, an alias or models:/cellscan/N) to make champion.")],
) -> None:
    """Make VERSION the champion (the previous one is remembered for rollback)."""
    from cellscan.mlops import registry

    settings = _store_settings()
    prev = registry.promote(settings, version, "manual promotion", ready=_loadable(settings))
    out.print(f"champion: version {prev} -> {registry.champion_version(settings)}")


@models_app.command("rollback")
@_boundary
def models_rollback(
    version: Annotated[str | None, typer.Argument(help="Version to roll back to (default: previous champion).")] = None,
) -> None:
    """Move the champion alias back to VERSION, or to the previous champion."""
    from cellscan.mlops import registry

    settings = _store_settings()
    before = registry.champion_version(settings)
    v = registry.rollback(settings, version, ready=_loadable(settings))
    out.print(f"champion is now version {v}")
    if before is not None and v > before:  # allowed (back to a newer version after a rollback), but said
        console.print(f"[yellow]note[/yellow]: version {v} is newer than the champion it replaced ({before}): "
                      f"this rolled forward; `cellscan models show {v}` has its gate decision", highlight=False)


@models_app.command("show")
@_boundary
def models_show(
    version: Annotated[str, typer.Argument(help="Version number or alias.")] = "champion",
    as_json: JsonOpt = False,
) -> None:
    """Lineage of VERSION: run, data hash, git commit, params, metrics, gate reason and the champion it was compared with."""
    from cellscan.mlops import registry

    info = registry.lineage(_store_settings(), version)
    if as_json:
        _dump(info)
        return
    head = Table(title=f"{_settings().model_name} version {info['version']} {','.join(info['aliases'])}", show_header=False)
    for k in ("run_name", "run_id", "kind", "finetuned_from", "data_hash", "git_commit", "duration_s", "gate",
              "compared_with", "description"):
        head.add_row(k, _num(info.get(k)) if info.get(k) is not None else "-")
    out.print(head)
    champ = info.get("champion_metrics") or {}
    t = Table(title="metrics (champion: on the same data at gate time)")
    cv = info.get("compared_with")
    for col in ("metric", "this version", f"champion v{cv}" if cv not in (None, "none") else "champion"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for k, v in sorted(info["metrics"].items()):
        if not k.startswith("epoch_"):
            t.add_row(k, _num(v), _num(champ[k]) if k in champ else "")
    out.print(t)
    p = Table(title="params")
    p.add_column("param")
    p.add_column("value")
    for k, v in sorted(info["params"].items()):
        p.add_row(k, str(v))
    out.print(p)


@models_app.command("reproduce")
@_boundary
def models_reproduce(
    version: Annotated[str, typer.Argument(help="Version number or alias.")],
    as_json: JsonOpt = False,
) -> None:
    """Retrain VERSION from its logged data version (DVC cache or remote) and params; print the metric difference."""
    from cellscan.mlops import steps

    s = _settings()
    with console.status(f"restoring data and retraining version {version}"):
        res = steps.reproduce(s, version, s.home)
    if as_json:
        _dump(res)
        return
    same = "same data" if res["same_data"] else f"DIFFERENT data ({res['restored_hash']})"
    start = f", fine-tuned from version {res['finetuned_from']}" if res.get("finetuned_from") else ""
    t = Table(title=f"reproduce version {res['version']} ({res['run_name']}, data {res['data_hash']}: "
                    f"{same}{start})")
    for col in ("metric", "logged", "reproduced", "difference"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for k in sorted(res["diff"]):
        t.add_row(k, _num(res["logged"][k]), _num(res["reproduced"][k]), _num(res["diff"][k]))
    out.print(t)


@models_app.command("register")
@_boundary
def models_register(
    bundle_dir: Annotated[Path, typer.Argument(help="Model bundle directory (e.g. models/latest from dvc repro).")],
    params: Annotated[Path | None, typer.Option("--params", "-p", help="params.yaml (default: in the project).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a bundle directory as a new version, through the champion gate."""
    from cellscan.mlops import steps

    s = _settings()
    p = load_params(params or s.home / "params.yaml")
    with steps.training_lock(s.home):
        res = steps.register_bundle(s, p, s.home, bundle_dir)
    if as_json:
        _dump(res)
        return
    verdict = "champion" if res["promoted"] else "challenger"
    out.print(f"registered {bundle_dir} as version {res['version']} (run {res['run_name']}): {verdict}, {res['reason']}")


@app.command("export")
@_boundary
def export(
    ref: Annotated[str, typer.Argument(help="Version number, alias (champion) or bundle directory.")] = "champion",
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx or tflite.")] = "onnx",
    quantize: Annotated[str | None, typer.Option(help="fp16 or int8 (judged by AUROC change, not verdicts).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Export directory (default: exports/v<N>-<format>).")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Dataset for the parity check (default: the version's data.root).")] = None,
    max_auroc_loss: Annotated[float, typer.Option(help="Largest image AUROC drop a quantized export may show.")] = 0.01,
    log: Annotated[bool, typer.Option(help="Log the export as artifacts of the version's MLflow run.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Export the networks to ONNX or TFLite beside the bundle's scoring files, after a parity check with Keras."""
    from cellscan.mlops.export import export_version

    settings = _store_settings(ref)
    with console.status(f"exporting {ref} to {fmt}{'-' + quantize if quantize else ''} and checking parity"):
        r = export_version(settings, ref, fmt, quantize, out_dir=out_dir, data_root=data,
                           max_auroc_loss=max_auroc_loss, log=log)
    if as_json:
        _dump(r)
        return
    keys = ("n_images", "max_abs_map_diff", "max_score_diff", "verdicts_differ", "image_auroc_keras",
            "image_auroc_export", "auroc_change", "seconds")
    out.print(_metrics_table(f"{r['export']} export of {ref} -> {r['out_dir']}: {r['reason']}", {k: r[k] for k in keys}))
    if r.get("artifact_uri"):
        out.print(f"logged to {r['artifact_uri']}")


client_app = typer.Typer(help="Talk to a running cellscan service.", no_args_is_help=True)
app.add_typer(client_app, name="client")


@client_app.command("predict")
@_boundary
def client_predict(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    url: Annotated[str, typer.Option(help="Service address.")] = "http://127.0.0.1:3000",
    out_csv: Annotated[Path, typer.Option("--out", help="Results CSV.")] = Path("results.csv"),
    events: Annotated[Path, typer.Option(help="Events log (JSON lines).")] = Path("events.log"),
    workers: Annotated[int, typer.Option(help="Concurrent requests.", min=1)] = 4,
    api_key: Annotated[str | None, typer.Option(envvar="CELLSCAN_API_KEY", help="API key.")] = None,
) -> None:
    """Send every image of FOLDER to /predict (3 tries with backoff); write results.csv and an events log."""
    from cellscan.serve.client import predict_folder

    if not folder.is_dir():
        msg = f"{folder} is a file; expected a folder of images" if folder.exists() else f"folder does not exist: {folder}"
        raise DatasetError(msg)
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        msg = f"--url {url!r}: expected the service's address, http(s)://host:port"
        raise ConfigError(msg)
    _output_file(out_csv, "results CSV")
    _output_file(events, "events log")
    s = predict_folder(folder, url, out_csv, events, workers=workers, api_key=api_key)
    out.print(f"{s.images} images: {s.ok} scored ({s.anomalies} anomalies), {s.failed} failed -> {out_csv}")
    out.print(f"process time {s.seconds:.2f} s, {1000 * s.per_prediction:.1f} ms per prediction "
              f"(metrics.json, metrics.prom beside {out_csv.name})")
    if s.failed:
        console.print(f"first failure: {s.first_error[:300]}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("mlflow-ui")
@_boundary
def mlflow_ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """Start the MLflow UI on the local store (or MLFLOW_TRACKING_URI)."""
    import os
    import subprocess

    s = _settings()
    if s.tracking_uri.startswith("sqlite:///"):
        Path(s.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "mlflow"
    console.print(f"MLflow UI: http://127.0.0.1:{port}  (store {s.tracking_uri})")
    cmd = [str(exe), "ui", "--backend-store-uri", s.tracking_uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    raise typer.Exit(subprocess.call(cmd, env=os.environ))


if __name__ == "__main__":
    app()
