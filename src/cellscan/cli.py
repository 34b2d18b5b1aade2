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

from cellscan.config import load_params, parse_overrides, setup_offline
from cellscan.errors import CellscanError

app = typer.Typer(help="cellscan: anomaly detection for CT/X-ray scans of battery cells.", no_args_is_help=True)
console = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a param: group.key=value.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Model directory.")]


def _boundary(fn: F) -> F:
    """Turn cellscan errors into one line on stderr and exit code 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CellscanError as exc:
            console.print(f"[red]{type(exc).__name__}[/red]: {exc}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


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


@app.command()
@_boundary
def synth(
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Dataset folder (default: data.root).")] = None,
    layout: Annotated[str, typer.Option(help="mvtec or roles.")] = "mvtec",
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate synthetic CT slices of cylindrical cells, with defects and masks."""
    from cellscan.synth import generate

    p = load_params(params, parse_overrides(overrides or []))
    root = out_dir or Path(p.data.root)
    s = p.synth
    with console.status(f"writing synthetic slices to {root}"):
        counts = generate(
            root, layout=layout, size=s.size, n_train=s.n_train, n_test_good=s.n_test_good,
            n_per_defect=s.n_per_defect, seed=p.base.seed, bit_depth=s.bit_depth,
        )
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
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Dataset folder (default: data.root).")] = None,
    model_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write the model directory.")] = Path(
        "models/latest"
    ),
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    metrics_file: Annotated[Path | None, typer.Option("--metrics", help="Also write metrics JSON here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the autoencoder on normal images and calibrate its threshold."""
    from cellscan.train import train as run_train

    p = load_params(params, parse_overrides(overrides or []))
    bar = [] if as_json or not sys.stderr.isatty() else [_EpochProgress(p.train.epochs)]
    res = run_train(p, data or Path(p.data.root), model_dir, callbacks=bar)
    summary = res.summary() | {"model_dir": str(model_dir)}
    if metrics_file:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        metrics_file.write_text(json.dumps(res.evaluation.metrics, indent=2))
    if as_json:
        _dump(summary | {"per_defect_auroc": res.evaluation.per_defect()})
    else:
        out.print(_metrics_table(f"trained model -> {model_dir}", summary))


@app.command()
@_boundary
def evaluate(
    model_dir: ModelOpt = Path("models/latest"),
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Dataset folder (default: data.root).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    calibrate: Annotated[bool, typer.Option(help="Recalibrate the threshold on this data.")] = False,
    metrics_file: Annotated[Path | None, typer.Option("--metrics", help="Also write metrics JSON here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score the validation normals and known anomalies; print image and pixel metrics."""
    from cellscan.artifact import CellscanModel
    from cellscan.data import load_dataset
    from cellscan.evaluate import evaluate_model

    p = load_params(params)
    model = CellscanModel.load_dir(model_dir)
    ds = load_dataset(data or Path(p.data.root))
    with console.status(f"scoring {len(ds.evaluation)} images"):
        ev = evaluate_model(model, ds, calibrate=calibrate, max_pixels=p.data.max_pixels)
    if metrics_file:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        metrics_file.write_text(json.dumps(ev.metrics, indent=2))
    per_defect = ev.per_defect() if ds.anomalies else {}
    if as_json:
        _dump(ev.metrics | {"per_defect_auroc": per_defect})
    else:
        out.print(_metrics_table(f"evaluation of {model_dir} on {ds.root}", ev.metrics))
        if per_defect:
            out.print(_metrics_table("image AUROC per defect type", per_defect))


@app.command()
@_boundary
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to score.")],
    model_dir: ModelOpt = Path("models/latest"),
    heatmaps: Annotated[Path | None, typer.Option(help="Write heatmap overlays (PNG) to this folder.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score images: is_anomaly, reconstruction_error and the threshold for each."""
    from cellscan.artifact import CellscanModel

    model = CellscanModel.load_dir(model_dir)
    res = model.score_images(images)
    rows = [{"image": str(path)} | res.record(i) for i, path in enumerate(images)]
    if heatmaps:
        from cellscan.viz import overlay_png

        heatmaps.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(images):
            x = model.load(path)
            (heatmaps / f"{path.stem}_heatmap.png").write_bytes(overlay_png(x, res.maps[i], model.threshold))
    if as_json:
        _dump(rows)
        return
    t = Table(title=f"predictions ({model_dir}, threshold {model.threshold:.4g})")
    for col in ("image", "reconstruction_error", "is_anomaly"):
        t.add_column(col, justify="right" if col != "image" else "left")
    for r in rows:
        flag = "[red]ANOMALY[/red]" if r["is_anomaly"] else "[green]normal[/green]"
        t.add_row(r["image"], f"{r['reconstruction_error']:.4g}", flag)
    out.print(t)


if __name__ == "__main__":
    app()
