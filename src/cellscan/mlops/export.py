"""Export a version's networks to ONNX or TFLite, check parity with Keras, log the export to the version's run.

Only the Keras graph is converted (image -> ``recon``, ``mask`` logits, at the working size padded to
the graph's multiple, any batch); everything after it stays the bundle's numpy scoring, carried in the
export directory as the bundle's own files (see :mod:`cellscan.edge` for the layout and the runtime).
An ONNX export also carries the pixel maps of that scoring as a second graph, ``maps.onnx``
(:mod:`cellscan.mlops.maps_onnx`), which the runtime uses in place of scipy.

Parity is measured before an export is kept, on the version's validation normals and known anomalies
(the dataset the model was trained on, ``params.data.root``, or ``data_root``): the largest absolute
difference of the anomaly maps and of the image scores, and how many verdicts differ. An unquantized
export is refused (:class:`~cellscan.errors.ParityError`) when any score moves by more than
``SCORE_TOLERANCE`` of the threshold (at least of 1), so a verdict can differ only for an image scored
within that tolerance of the threshold; a quantized one (``fp16``, ``int8``) when its image AUROC is more than
``max_auroc_loss`` below the Keras model's. A dataset with no known anomalies gets CT-like defects
simulated on its validation normals (``simulated-defect-<i>``), so that AUROC has something to rank and an
export whose scores all sink is not read as one whose normals stay normal.
The figures are written to ``parity.json`` in the export, and logged with it to MLflow as artifacts
``exports/<format>[-<quantize>]/`` of the version's run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellscan import __version__
from cellscan.core.augment import simulate_ct_defect
from cellscan.core.bundle import MODEL_FILE, CellscanModel, ScoreResult, check_replaceable, staging_dir
from cellscan.core.scoring import maps_key
from cellscan.edge import EXPORT_INFO, MODEL_FILES, PARITY_FILE, load_export, read_info
from cellscan.errors import ConfigError, DatasetError, ModelError, ParityError
from cellscan.files import swap_in
from cellscan.mlops import maps_onnx

if TYPE_CHECKING:
    from cellscan.settings import Settings

logger = logging.getLogger(__name__)

FORMATS = tuple(MODEL_FILES)
QUANTIZATIONS = ("fp16", "int8")
EXPORTS_DIR = "exports"  # under the project folder, and in the run's artifacts
OPSET = 17
MAPS_FILE = "maps.onnx"
EXPORT_TAG = "cellscan.export"
SCORE_TOLERANCE = 0.01  # an unquantized export's scores: at most this share of the threshold (or of 1) away
SIMULATED_ANOMALIES = 32  # simulated when the dataset holds no known anomaly


def export_name(fmt: str, quantize: str | None = None) -> str:
    """``onnx``, ``onnx-int8``, ``tflite-fp16`` ...

    Raises:
        ConfigError: unknown format or quantization.
    """
    if fmt not in FORMATS:
        msg = f"unknown export format {fmt!r}; must be one of: {', '.join(FORMATS)}"
        raise ConfigError(msg)
    if quantize not in (None, *QUANTIZATIONS):
        msg = f"unknown quantization {quantize!r}; must be one of: {', '.join(QUANTIZATIONS)}"
        raise ConfigError(msg)
    return fmt if quantize is None else f"{fmt}-{quantize}"


def padded_shape(model: CellscanModel) -> tuple[int, int]:
    """The working size rounded up to the graph's multiple (the Keras path pads the same way)."""
    m = int(model.meta.get("multiple", 8))
    h, w = model.shape
    return h + (-h % m), w + (-w % m)


# -- conversion -------------------------------------------------------------------------------
def _to_onnx(net: Any, path: Path, shape: tuple[int, int, int], quantize: str | None, calib: np.ndarray) -> str:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *shape), tf.float32, name="image"),)
    plain = path if quantize is None else path.with_name("fp32.onnx")
    tf2onnx.convert.from_keras(net, input_signature=spec, opset=OPSET, output_path=str(plain))
    if quantize == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(plain)), keep_io_types=True), str(path))
    elif quantize == "int8":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self.items = iter([{"image": calib[i : i + 1]} for i in range(len(calib))])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.items, None)

        quantize_static(str(plain), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    if plain != path:
        plain.unlink()
    return f"tf2onnx {tf2onnx.__version__}, opset {OPSET}"


def _to_tflite(net: Any, path: Path, shape: tuple[int, int, int], quantize: str | None, calib: np.ndarray) -> str:
    import keras
    import tensorflow as tf

    saved = path.with_name("saved_model")
    # Keras 3 models do not go through TFLiteConverter.from_keras_model; a SavedModel keeps the output names.
    net.export(str(saved), format="tf_saved_model", verbose=False,
               input_signature=[keras.InputSpec(shape=(None, *shape), dtype="float32", name="image")])
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if quantize == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
    path.write_bytes(conv.convert())
    shutil.rmtree(saved, ignore_errors=True)
    return f"tensorflow {tf.__version__} TFLiteConverter"


# -- parity -----------------------------------------------------------------------------------
def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2 or not np.isfinite(scores).all():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def parity_report(reference: ScoreResult, exported: ScoreResult, labels: np.ndarray, names: list[str],
                  quantize: str | None, max_auroc_loss: float = 0.01) -> dict[str, Any]:
    """Compare the export's scores with the Keras model's on the same images; ``ok`` says whether to keep it.

    Unquantized: every score within ``SCORE_TOLERANCE`` x max(1, |threshold|) of the Keras model's, so a
    verdict differs only where Keras scored within that of the threshold (``borderline``), and an
    export whose scores all sink (every normal still "normal") is refused. Quantized: the image AUROC may
    drop by at most ``max_auroc_loss`` (verdict differences are reported, not refused). Either way, an
    export whose scores, maps or reconstructions are not all finite numbers where the Keras model's are is
    refused (NaN compares as False, so its verdicts would all read "normal" and look identical).

    Example:
        >>> ref = ScoreResult(np.array([0.1, 2.0]), np.zeros(2), np.zeros((2, 2, 2)), np.zeros((2, 2, 2, 1)), 1.0)
        >>> got = ScoreResult(np.array([0.1, 0.9]), np.zeros(2), np.zeros((2, 2, 2)), np.zeros((2, 2, 2, 1)), 1.0)
        >>> r = parity_report(ref, got, np.array([0, 1]), ["a.png", "b.png"], None)
        >>> r["ok"], r["verdicts_differ"], r["differing"], round(r["max_score_diff"], 6)
        (False, 1, ['b.png'], 1.1)
    """
    differ = reference.is_anomaly != exported.is_anomaly
    auroc_k, auroc_e = _auroc(labels, reference.scores), _auroc(labels, exported.scores)
    tolerance = SCORE_TOLERANCE * max(1.0, abs(float(reference.threshold)))
    report: dict[str, Any] = {
        "n_images": len(labels), "n_normal": int(np.sum(labels == 0)), "n_anomaly": int(np.sum(labels == 1)),
        "max_abs_map_diff": float(np.max(np.abs(reference.maps - exported.maps))) if len(labels) else 0.0,
        "max_score_diff": float(np.max(np.abs(reference.scores - exported.scores))) if len(labels) else 0.0,
        "max_abs_recon_diff": float(np.max(np.abs(reference.recon - exported.recon))) if len(labels) else 0.0,
        "threshold": float(reference.threshold),
        "verdicts_identical": bool(not differ.any()), "verdicts_differ": int(differ.sum()),
        "differing": [names[i] for i in np.flatnonzero(differ)][:50],
        "image_auroc_keras": auroc_k, "image_auroc_export": auroc_e,
        "auroc_change": auroc_e - auroc_k, "quantize": quantize, "max_auroc_loss": max_auroc_loss,
        "score_tolerance": tolerance,
    }
    broken = [what for what, ref, got in (("scores", reference.scores, exported.scores),
                                          ("maps", reference.maps, exported.maps),
                                          ("reconstructions", reference.recon, exported.recon))
              if not np.isfinite(got).all() and np.isfinite(ref).all()]
    if broken:
        report["ok"] = False
        report["reason"] = (f"the export gives non-finite {', '.join(broken)} (NaN or infinity) where Keras "
                            "does not")
    elif quantize is None:
        n, diff = report["verdicts_differ"], report["max_score_diff"]
        report["ok"] = bool(diff <= tolerance)
        if not report["ok"]:
            flipped = f"; {n} of {len(labels)} verdicts differ" if n else ""
            report["reason"] = (f"scores differ from the Keras model's by up to {diff:.3g}, more than the "
                                f"{tolerance:.3g} allowed{flipped}")
        else:
            report["reason"] = "all verdicts identical" if not n else (
                f"scores within {tolerance:.3g}; {n} of {len(labels)} verdicts differ on images Keras scored "
                "within that of the threshold (borderline)")
            report["borderline"] = n
    elif math.isnan(auroc_k) or math.isnan(auroc_e):
        report["ok"] = report["verdicts_identical"]
        report["reason"] = ("no known anomalies to measure AUROC on; " +
                            ("all verdicts identical" if report["ok"] else "and verdicts differ"))
    else:
        report["ok"] = bool(auroc_k - auroc_e <= max_auroc_loss + 1e-12)
        report["reason"] = (f"image AUROC {auroc_k:.4f} -> {auroc_e:.4f} (change {auroc_e - auroc_k:+.4f}, "
                            f"allowed loss {max_auroc_loss})")
    return report


def _evaluation_images(model: CellscanModel, data_root: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """(validation + anomaly images, labels, names, up to 32 training normals for int8 calibration); with no
    known anomaly, ``SIMULATED_ANOMALIES`` CT-like defects simulated on the validation normals stand in."""
    from cellscan.core.data import load_dataset
    from cellscan.core.images import load_batch

    if not Path(data_root).is_dir():
        msg = (f"parity needs the version's validation images, but its dataset folder is missing: {data_root}; "
               "pass the dataset root (--data)")
        raise DatasetError(msg)
    ds = load_dataset(data_root)
    samples = ds.evaluation
    if not samples:
        msg = f"{data_root}: no validation images or known anomalies to check the export's parity on"
        raise DatasetError(msg)
    x = load_batch([s.path for s in samples], size=model.shape, channels=model.channels)
    train = load_batch(ds.train[:32], size=model.shape, channels=model.channels)
    labels = np.array([s.label for s in samples])
    names = [str(Path(s.path).relative_to(ds.root)) for s in samples]
    if not labels.any():  # nothing to rank: CT-like defects on copies of the validation normals
        rng = np.random.default_rng(0)
        fake = np.stack([simulate_ct_defect(x[i % len(x)], rng)[0] for i in range(SIMULATED_ANOMALIES)])
        x = np.concatenate([x, fake.astype(x.dtype)])
        labels = np.concatenate([labels, np.ones(len(fake), int)])
        names += [f"simulated-defect-{i}" for i in range(len(fake))]
    return x, labels, names, train


def default_data_root(model: CellscanModel, home: Path | None = None) -> Path:
    """The dataset the model was trained on: ``params.data.root`` from its metadata, under ``home``."""
    root = Path(((model.meta.get("params") or {}).get("data") or {}).get("root", "data/cells"))
    return root if root.is_absolute() or home is None else Path(home) / root


# -- the export -------------------------------------------------------------------------------
def export_model(
    model: CellscanModel, out_dir: str | Path, fmt: str = "onnx", quantize: str | None = None, *,
    data_root: str | Path, max_auroc_loss: float = 0.01, source: str | None = None,
    source_version: int | None = None,
) -> dict[str, Any]:
    """Convert ``model``'s networks, check parity on ``data_root`` and write the export directory atomically.

    Returns:
        The parity report (also in ``out_dir/parity.json``), with ``out_dir`` and ``seconds`` added.

    Raises:
        ConfigError: unknown format or quantization.
        DatasetError: no evaluation images at ``data_root``.
        ModelError: the model has no Keras networks (it is itself an export).
        ParityError: the export's scores move by more than the tolerance, or (quantized) it loses more
            AUROC than allowed;
            nothing is written at ``out_dir`` then (the figures go to ``<out_dir>.refused.json``).
    """
    name = export_name(fmt, quantize)
    if model.keras_model is None:
        msg = "this model has no Keras networks to export (it was loaded from an export)"
        raise ModelError(msg)
    t0 = time.perf_counter()
    out_dir = check_replaceable(out_dir, (EXPORT_INFO, PARITY_FILE), "export")  # never the bundle itself
    x, labels, names, train = _evaluation_images(model, Path(data_root))
    work = staging_dir(out_dir, "export", ConfigError)
    try:
        # Every file the bundle writes except the Keras graph: whatever its scoring reads comes along.
        model.save(work / "bundle")
        for f in (work / "bundle").iterdir():
            if f.name != MODEL_FILE:
                shutil.move(str(f), work / f.name)
        shutil.rmtree(work / "bundle")
        h, w = padded_shape(model)
        pad = ((0, 0), (0, h - model.shape[0]), (0, w - model.shape[1]), (0, 0))
        calib = np.pad(train, pad, mode="reflect") if h != model.shape[0] or w != model.shape[1] else train
        convert = _to_onnx if fmt == "onnx" else _to_tflite
        converter = convert(model.keras_model, work / MODEL_FILES[fmt], (h, w, model.channels), quantize, calib)
        info = {"format": fmt, "file": MODEL_FILES[fmt], "quantize": quantize, "name": name,
                "input_shape": [h, w, model.channels], "working_shape": list(model.shape), "converter": converter,
                "source": source, "source_version": source_version, "cellscan_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if fmt == "onnx" and model.score_params.map in maps_onnx.KINDS:
            # The numpy maps after the networks as a second graph (onnxruntime runs it in a fraction of
            # scipy's time); the parity check below covers it.
            import onnx

            graph = maps_onnx.build_maps_graph(model.shape, model.channels, model.score_params, model.stats,
                                               model.has_head, OPSET)
            onnx.save(graph, str(work / MAPS_FILE))
            info |= {"maps_file": MAPS_FILE, "maps_key": maps_key(model.score_params)}
        (work / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        exported = load_export(work)
        report = parity_report(model.score_arrays(x), exported.score_arrays(x), labels, names, quantize,
                               max_auroc_loss)
        report |= {"export": name, "data_root": str(data_root), "seconds": round(time.perf_counter() - t0, 2),
                   "simulated_anomalies": sum(n.startswith("simulated-defect-") for n in names)}
        (work / PARITY_FILE).write_text(json.dumps(report, indent=2))
        if not report["ok"]:
            refused = out_dir.with_name(f"{out_dir.name}.refused.json")
            refused.write_text(json.dumps(report, indent=2))
            msg = (f"{name} export refused: {report['reason']} (max score diff {report['max_score_diff']:.3g}, "
                   f"max map diff {report['max_abs_map_diff']:.3g}; figures in {refused})")
            raise ParityError(msg)
        swap_in(work, out_dir)  # the earlier export stays whole until this one is in place
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report["out_dir"] = str(out_dir)
    logger.info("exported %s to %s: %s", name, out_dir, report["reason"])
    return report


def default_out_dir(home: Path, version: int | None, source: str, name: str) -> Path:
    label = f"v{version}" if version is not None else Path(source).name
    return Path(home) / EXPORTS_DIR / f"{label}-{name}"


def log_export(settings: Settings, version: int, out_dir: Path, report: dict[str, Any]) -> str:
    """Log the export directory as artifacts ``exports/<name>`` of the version's run, and tag the version."""
    from cellscan.mlops.tracking import client

    mc = client(settings)
    mv = mc.get_model_version(settings.model_name, str(version))
    path = f"{EXPORTS_DIR}/{report['export']}"
    mc.log_artifacts(mv.run_id, str(out_dir), artifact_path=path)
    summary = {k: report[k] for k in ("max_abs_map_diff", "max_score_diff", "verdicts_identical", "auroc_change")}
    mc.set_model_version_tag(settings.model_name, str(version), f"{EXPORT_TAG}.{report['export']}",
                             json.dumps(summary | {"artifacts": path})[:5000])
    return f"runs:/{mv.run_id}/{path}"


def export_version(
    settings: Settings, ref: int | str | Path = "champion", fmt: str = "onnx", quantize: str | None = None, *,
    out_dir: Path | None = None, data_root: Path | None = None, max_auroc_loss: float = 0.01, log: bool = True,
) -> dict[str, Any]:
    """Export a registered version (number or alias) or a bundle directory; log it to the version's run.

    Returns:
        The parity report with ``out_dir``, ``version`` and (when logged) ``artifact_uri``.
    """
    from cellscan.mlops import registry

    name = export_name(fmt, quantize)
    model, version = registry.load_model(ref, settings)
    out_dir = out_dir or default_out_dir(settings.home, version, str(ref), name)
    report = export_model(model, out_dir, fmt, quantize, data_root=data_root or default_data_root(model, settings.home),
                          max_auroc_loss=max_auroc_loss, source=str(ref), source_version=version)
    report["version"] = version
    if version is not None and log:
        report["artifact_uri"] = log_export(settings, version, Path(report["out_dir"]), report)
    return report


def _matches(directory: Path, version: int, threshold: float, fmt: str) -> bool:
    """Whether ``directory`` holds a passed, unquantized ``fmt`` export of ``version`` at ``threshold`` (what
    the service serves; a quantized export made for a device with ``cellscan export --out`` there is not)."""
    try:
        info = read_info(directory)
        meta = json.loads((directory / "meta.json").read_text())
        parity = json.loads((directory / PARITY_FILE).read_text())
    except (ModelError, OSError, ValueError, KeyError):
        return False
    # ONNX exports made before maps.onnx existed are made again: the maps graph is most of its speed.
    maps_ok = (info.get("format") != "onnx" or bool(info.get("maps_file"))
               or meta["score"]["map"] not in maps_onnx.KINDS)
    return (info.get("source_version") == version and float(meta["threshold"]) == threshold
            and info.get("format") == fmt and info.get("quantize") is None and bool(parity.get("ok"))
            and maps_ok)


def _export_for_serving(settings: Settings, model: CellscanModel, version: int, fmt: str,
                        target: Path) -> None:
    report = export_model(model, target, fmt, data_root=default_data_root(model, settings.home),
                          source=f"models:/{settings.model_name}/{version}", source_version=version)
    log_export(settings, version, target, report)


def serving_model(settings: Settings, model: CellscanModel, version: int, fmt: str = "onnx") -> CellscanModel:
    """The version scoring through ``fmt``'s runtime, from its export (made on demand when missing).

    Looks in ``<home>/exports/v<N>-<fmt>``, then in the version run's artifacts (another replica may
    have made it), and otherwise exports ``model`` there (with the parity check) and logs it.
    """
    name = export_name(fmt)
    target = default_out_dir(settings.home, version, "", name)
    if not _matches(target, version, model.threshold, fmt):
        from cellscan.mlops.tracking import client

        mc = client(settings)
        run_id = mc.get_model_version(settings.model_name, str(version)).run_id
        try:
            import mlflow.artifacts

            with tempfile.TemporaryDirectory(dir=target.parent if target.parent.is_dir() else None) as tmp:
                got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{EXPORTS_DIR}/{name}",
                                                               dst_path=tmp, tracking_uri=settings.tracking_uri))
                if _matches(got, version, model.threshold, fmt):  # copied beside, then swapped in whole
                    work = staging_dir(target, "export", ConfigError)
                    try:
                        shutil.copytree(got, work, dirs_exist_ok=True)
                        swap_in(work, target)
                    except BaseException:
                        shutil.rmtree(work, ignore_errors=True)
                        raise
                    logger.info("version %s: %s export taken from run %s", version, name, run_id)
        except Exception as exc:  # absent artifact: MlflowException or OSError, depending on the store
            logger.info("version %s has no logged %s export (%s): exporting it now", version, name, exc)
        if not _matches(target, version, model.threshold, fmt):
            _export_for_serving(settings, model, version, fmt, target)
    try:
        served = load_export(target, threads=1)
    except ModelError as exc:  # its files damaged since (a disk, a hand): made again, not refused forever
        logger.warning("version %s: the %s export in %s cannot be loaded (%s): exporting it again", version,
                       name, target, exc)
        _export_for_serving(settings, model, version, fmt, target)
        served = load_export(target, threads=1)
    served.meta["registry_version"] = version
    return served
