"""Export to ONNX / TFLite with a real sqlite MLflow store: parity figures, refusals, artifacts, ONNX serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cellscan.core.bundle import CellscanModel, ScoreResult
from cellscan.core.config import GateParams
from cellscan.core.data import load_dataset
from cellscan.core.images import load_batch
from cellscan.edge import load_export
from cellscan.errors import ConfigError, ParityError
from cellscan.mlops import export, registry, tracking
from cellscan.mlops.gate import decide
from cellscan.settings import Settings


def _result(scores: list[float], threshold: float = 1.0) -> ScoreResult:
    n = len(scores)
    return ScoreResult(np.array(scores, np.float32), np.zeros(n), np.zeros((n, 2, 2)), np.zeros((n, 2, 2, 1)), threshold)


@pytest.mark.parametrize(("got", "quantize", "max_loss", "ok"), [
    ([0.1, 0.2, 1.5, 2.0], None, 0.01, True),      # identical verdicts, tiny score drift
    ([0.1, 1.2, 1.5, 2.0], None, 0.01, False),     # one normal crosses the threshold
    ([0.1, 1.6, 1.5, 2.0], "int8", 0.01, False),   # AUROC 1.0 -> 0.75: loss 0.25
    ([0.1, 1.6, 1.5, 2.0], "int8", 0.3, True),     # the same loss, allowed
    ([0.1, 1.2, 1.5, 2.0], "fp16", 0.0, True),     # a verdict differs but the ranking (AUROC) is kept
])
def test_parity_report(got, quantize, max_loss, ok):
    ref = _result([0.1, 0.2, 1.5, 2.0])
    r = export.parity_report(ref, _result(got), np.array([0, 0, 1, 1]), ["a", "b", "c", "d"], quantize, max_loss)
    assert r["ok"] is ok
    assert r["verdicts_identical"] is (got[1] < 1.0)
    assert r["max_score_diff"] == pytest.approx(max(abs(a - b) for a, b in zip(got, [0.1, 0.2, 1.5, 2.0])))
    assert r["image_auroc_keras"] == 1.0


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_an_export_giving_nan_is_refused_not_read_as_identical_verdicts(quantize):
    """NaN > threshold is False: every verdict would read "normal" and match a set without anomalies."""
    ref = _result([0.1, 0.2, 0.3])
    r = export.parity_report(ref, _result([float("nan")] * 3), np.array([0, 0, 0]), ["a", "b", "c"], quantize)
    assert r["ok"] is False
    assert r["reason"] == "the export gives non-finite scores (NaN or infinity) where Keras does not"
    bad_maps = _result([0.1, 0.2, 1.5])
    bad_maps.maps[1, 0, 0] = np.inf
    labels = np.array([0, 0, 1])
    r = export.parity_report(_result([0.1, 0.2, 1.5]), bad_maps, labels, ["a", "b", "c"], quantize)
    assert r["ok"] is False
    assert "non-finite maps" in r["reason"]



def test_an_unquantized_export_whose_scores_all_sink_is_refused_though_no_verdict_differs():
    """Normals only: lower scores keep every normal "normal", yet such an export would miss defects."""
    ref = _result([0.5, 0.7, 0.9])
    r = export.parity_report(ref, _result([0.05, 0.07, 0.09]), np.array([0, 0, 0]), ["a", "b", "c"], None)
    assert r["verdicts_identical"] is True
    assert r["ok"] is False
    assert r["reason"] == "scores differ from the Keras model's by up to 0.81, more than the 0.01 allowed"


def test_a_verdict_flipped_on_the_threshold_itself_is_borderline_not_a_refusal():
    """A threshold calibrated as a quantile sits exactly on a normal's score: float rounding may flip it."""
    ref = _result([0.5, 2.0, 2.5], threshold=2.0)  # 2.0 > 2.0 is False: normal
    r = export.parity_report(ref, _result([0.5, 2.000001, 2.5], threshold=2.0), np.array([0, 0, 1]),
                             ["a", "b", "c"], None)
    assert r["verdicts_differ"] == 1 and r["borderline"] == 1
    assert r["ok"] is True and r["score_tolerance"] == pytest.approx(0.02)
    assert "borderline" in r["reason"]


def test_a_dataset_without_known_anomalies_gets_simulated_ones_to_rank(trained, dataset_dir, tmp_path):
    normals_only = tmp_path / "cells"
    shutil.copytree(dataset_dir / "train", normals_only / "train")
    shutil.copytree(dataset_dir / "test" / "good", normals_only / "test" / "good")
    x, labels, names, _ = export._evaluation_images(trained.model, normals_only)
    n_normal = len(load_dataset(normals_only).evaluation)
    assert len(x) == len(labels) == len(names) == n_normal + export.SIMULATED_ANOMALIES
    assert labels[:n_normal].sum() == 0 and labels[n_normal:].all()
    assert names[n_normal:] == [f"simulated-defect-{i}" for i in range(export.SIMULATED_ANOMALIES)]
    assert np.abs(x[n_normal:] - x[np.arange(export.SIMULATED_ANOMALIES) % n_normal]).max() > 0.05
    scores = trained.model.score_arrays(x).scores  # the model ranks them: an AUROC, not NaN, to compare
    assert not np.isnan(export._auroc(labels, scores))
    x2, labels2, _, _ = export._evaluation_images(trained.model, dataset_dir)  # known anomalies: none added
    assert len(x2) == len(load_dataset(dataset_dir).evaluation) and labels2.any()

def test_unknown_format_and_quantization_are_config_errors():
    with pytest.raises(ConfigError, match="one of: onnx, tflite"):
        export.export_name("coreml")
    with pytest.raises(ConfigError, match="one of: fp16, int8"):
        export.export_name("onnx", "int4")


def test_runtime_setting_is_checked(tmp_path):
    assert Settings.from_env(tmp_path, env={"CELLSCAN_RUNTIME": "ONNX"}).runtime == "onnx"
    with pytest.raises(ConfigError, match="CELLSCAN_RUNTIME"):
        Settings.from_env(tmp_path, env={"CELLSCAN_RUNTIME": "torch"})


@pytest.fixture
def project(tmp_path: Path, dataset_dir: Path) -> Path:
    """A project folder whose data.root (data/cells) is the session's tiny dataset."""
    home = tmp_path / "proj"
    (home / "data").mkdir(parents=True)
    (home / "data" / "cells").symlink_to(dataset_dir)
    return home


def _register(settings: Settings, model_dir: Path) -> int:
    run = tracking.open_run(settings, "train")
    version = tracking.log_and_register(settings, run, model_dir)
    registry.apply_decision(settings, version, decide({"image_auroc": 0.9, "f1": 0.9}, None, GateParams()),
                            None, None, run.name)
    tracking.close_run(settings, run)
    return version


def _eval_images(model: CellscanModel, dataset_dir: Path) -> np.ndarray:
    return load_batch([s.path for s in load_dataset(dataset_dir).evaluation], size=model.shape, channels=model.channels)


def test_onnx_export_of_the_champion_is_logged_to_its_run(trained, model_dir, dataset_dir, project):
    settings = Settings.from_env(project, env={})
    version = _register(settings, model_dir)
    r = export.export_version(settings, "champion", "onnx")
    out = Path(r["out_dir"])
    assert out == project / "exports" / f"v{version}-onnx"
    assert r["ok"] and r["verdicts_identical"] and r["n_images"] == len(load_dataset(dataset_dir).evaluation)
    assert r["max_score_diff"] < 1e-3 and r["max_abs_map_diff"] < 1e-3
    assert json.loads((out / "parity.json").read_text())["max_score_diff"] == r["max_score_diff"]
    names = {p.name for p in out.iterdir()}
    assert {"export.json", "map_stats.npz", "meta.json", "model.onnx", "maps.onnx", "parity.json"} <= names
    assert json.loads((out / "export.json").read_text())["maps_key"]["map"] == "l2_ssim"
    assert load_export(out)._maps is not None  # the parity above was measured through the maps graph
    older = out.with_name("older")  # an export made before maps.onnx: the service makes it again
    shutil.copytree(out, older)
    info = json.loads((older / "export.json").read_text())
    (older / "export.json").write_text(json.dumps({k: v for k, v in info.items() if not k.startswith("maps_")}))
    assert export._matches(out, version, r["threshold"], "onnx")
    assert not export._matches(older, version, r["threshold"], "onnx")
    assert not export._matches(out, version, r["threshold"], "tflite")  # another runtime's export is not it
    quantized = out.with_name("quantized")  # a device's int8 export at the service's path is not served
    shutil.copytree(out, quantized)
    info = json.loads((out / "export.json").read_text())
    (quantized / "export.json").write_text(json.dumps(info | {"quantize": "int8"}))
    assert not export._matches(quantized, version, r["threshold"], "onnx")
    assert load_export(older)._maps is None and load_export(older).score_arrays  # still loads, numpy maps
    assert "model.keras" not in names and not any(n.startswith(".") for n in names)

    mc = registry.client(settings)
    mv = mc.get_model_version("cellscan", str(version))
    logged = {Path(a.path).name for a in mc.list_artifacts(mv.run_id, "exports/onnx")}
    assert {"model.onnx", "parity.json", "meta.json", "export.json"} <= logged
    assert json.loads(mv.tags["cellscan.export.onnx"])["verdicts_identical"] is True

    keras_model = CellscanModel.load_dir(model_dir)
    x = _eval_images(keras_model, dataset_dir)
    a, b = keras_model.score_arrays(x), load_export(out).score_arrays(x)
    assert (a.is_anomaly == b.is_anomaly).all() and np.allclose(a.scores, b.scores, atol=1e-3)


def test_tflite_export_of_a_directory(trained, model_dir, dataset_dir, tmp_path):
    settings = Settings.from_env(tmp_path / "p", env={})
    r = export.export_version(settings, str(model_dir), "tflite", out_dir=tmp_path / "lite", data_root=dataset_dir)
    assert r["ok"] and r["verdicts_identical"] and r["version"] is None and "artifact_uri" not in r
    assert r["max_score_diff"] < 1e-3
    assert load_export(tmp_path / "lite").meta["export"]["format"] == "tflite"


def test_quantized_export_is_judged_by_auroc_and_refused_beyond_the_allowed_loss(trained, model_dir, dataset_dir,
                                                                                    tmp_path):
    model = CellscanModel.load_dir(model_dir)
    r = export.export_model(model, tmp_path / "q8", "onnx", "int8", data_root=dataset_dir, max_auroc_loss=1.0)
    assert r["ok"] and np.isfinite(r["auroc_change"]) and r["quantize"] == "int8"
    assert r["max_abs_recon_diff"] > 1e-6  # int8 really changes the network's output
    # Requiring the AUROC to rise by 1.0 cannot be met: refused, nothing left at the target.
    with pytest.raises(ParityError, match="onnx-int8 export refused: image AUROC"):
        export.export_model(model, tmp_path / "q8b", "onnx", "int8", data_root=dataset_dir, max_auroc_loss=-1.0)
    assert not (tmp_path / "q8b").exists()
    assert json.loads((tmp_path / "q8b.refused.json").read_text())["ok"] is False


def test_export_without_the_dataset_is_a_clear_error(trained, model_dir, tmp_path):
    from cellscan.errors import DatasetError

    with pytest.raises(DatasetError, match="pass the dataset root"):
        export.export_model(CellscanModel.load_dir(model_dir), tmp_path / "e", data_root=tmp_path / "nowhere")


def test_export_never_replaces_the_bundle_or_a_folder_of_other_files(trained, model_dir, dataset_dir, tmp_path):
    from cellscan.errors import ModelError

    bundle = Path(shutil.copytree(model_dir, tmp_path / "bundle"))
    before = sorted(f.name for f in bundle.iterdir())
    with pytest.raises(ModelError, match=r"holds other files .* and no export"):
        export.export_model(CellscanModel.load_dir(bundle), bundle, data_root=dataset_dir)
    assert sorted(f.name for f in bundle.iterdir()) == before  # model.keras is still there
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ModelError, match="a.txt is a file"):
        export.export_model(CellscanModel.load_dir(bundle), tmp_path / "a.txt", data_root=dataset_dir)


def test_holder_serves_through_onnx_and_reuses_the_logged_export(trained, model_dir, dataset_dir, project):
    import shutil

    from cellscan.serve.runtime import ModelHolder

    settings = Settings.from_env(project, env={"CELLSCAN_RUNTIME": "onnx"})
    version = _register(settings, model_dir)
    holder = ModelHolder(settings, poll_seconds=0)
    model, v = holder.current()
    assert v == version and model.keras_model is None and model.meta["export"]["format"] == "onnx"
    keras_model = CellscanModel.load_dir(model_dir)
    x = _eval_images(keras_model, dataset_dir)
    assert (model.score_arrays(x).is_anomaly == keras_model.score_arrays(x).is_anomaly).all()

    # Another replica (no local export): it takes the one logged to the run instead of exporting again.
    local = project / "exports" / f"v{version}-onnx"
    created = json.loads((local / "export.json").read_text())["created"]
    shutil.rmtree(local)
    again, _ = ModelHolder(settings, poll_seconds=0).current()
    assert again.meta["export"]["created"] == created and (local / "model.onnx").is_file()

    # Its model file damaged since (a truncated copy): exported again, not refused on every refresh.
    (local / "model.onnx").write_bytes(b"truncated")
    fixed, _ = ModelHolder(settings, poll_seconds=0).current()
    assert (local / "model.onnx").stat().st_size > 1000  # the export made again, whole
    assert (fixed.score_arrays(x).is_anomaly == keras_model.score_arrays(x).is_anomaly).all()


def test_holder_starts_serving_nothing_when_the_champion_cannot_be_loaded(trained, model_dir, project):
    import mlflow

    from cellscan.errors import NoModelError
    from cellscan.serve.runtime import ModelHolder

    settings = Settings.from_env(project)
    good = _register(settings, model_dir)
    mc = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    broken = mc.create_model_version(settings.model_name, str(project / "no-such-model"))  # no files there
    mc.set_registered_model_alias(settings.model_name, "champion", broken.version)
    holder = ModelHolder(settings, poll_seconds=0)  # no exception: the service starts and /health says why
    assert holder.champion == int(broken.version), holder.champion
    assert holder.version is None
    assert holder.last_error is not None
    with pytest.raises(NoModelError):
        holder.current()
    holder.install(holder.prepare(good), good)  # what a rollback to the good version does
    assert holder.current()[1] == good
    assert holder.last_error is None


def test_holder_does_not_convert_a_refused_export_again_every_poll(trained, model_dir, project, monkeypatch):
    from cellscan.serve.runtime import ModelHolder

    settings = Settings.from_env(project, env={"CELLSCAN_RUNTIME": "onnx"})
    version = _register(settings, model_dir)
    calls: list[int] = []

    def refused(settings, model, v, fmt):  # noqa: ANN001, ARG001 - the parity check's verdict, not its cost
        calls.append(v)
        msg = f"onnx export refused: version {v}"
        raise ParityError(msg)

    monkeypatch.setattr(export, "serving_model", refused)
    holder = ModelHolder(settings, poll_seconds=0)
    assert calls == [version] and holder.version is None
    assert holder.last_error == f"ParityError: onnx export refused: version {version}"
    holder.last_error = "MlflowException: a poll while the registry was down"
    assert holder.refresh() is None and calls == [version]  # the next poll: not converted again
    assert holder.last_error == f"ParityError: onnx export refused: version {version}"  # the reason again
    monkeypatch.setattr("cellscan.serve.runtime.REFUSED_RETRY_S", 0.0)  # ten minutes later: looked at again
    with pytest.raises(ParityError):
        holder.refresh()
    assert calls == [version, version]
    second = _register(settings, model_dir)
    registry.client(settings).set_registered_model_alias("cellscan", "champion", str(second))  # alias moved
    with pytest.raises(ParityError):
        holder.refresh()
    assert calls == [version, version, second]

def test_cli_export(trained, model_dir, dataset_dir, tmp_path, monkeypatch):
    from cellscan.cli import app

    monkeypatch.setenv("CELLSCAN_HOME", str(tmp_path / "p"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = CliRunner().invoke(app, ["export", str(model_dir), "--format", "onnx", "--data", str(dataset_dir),
                                   "--out", str(tmp_path / "x"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verdicts_identical"] is True
    res = CliRunner().invoke(app, ["export", str(model_dir), "--format", "coreml"])
    assert res.exit_code == 1 and "ConfigError" in res.output
