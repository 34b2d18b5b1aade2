"""Registry with a real sqlite MLflow store: references, one bundle per version, gate writes, rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellscan.core.config import GateParams
from cellscan.errors import ConfigError, RegistryError
from cellscan.mlops import registry, tracking
from cellscan.mlops.gate import decide
from cellscan.settings import Settings


@pytest.mark.parametrize(("ref", "want"), [
    ("models:/cellscan@champion", ("cellscan", "champion")),
    ("models:/other/3", ("other", 3)),
    ("7", (None, 7)),
    (7, (None, 7)),
    ("champion", (None, "champion")),
    ("models/latest", (None, Path("models/latest"))),
])
def test_parse_ref(ref, want):
    assert registry.parse_ref(ref) == want


def test_parse_ref_rejects_an_incomplete_uri():
    with pytest.raises(ConfigError):
        registry.parse_ref("models:/cellscan")


def test_load_model_from_a_directory_needs_no_registry(trained, model_dir):
    model, version = registry.load_model(model_dir)
    assert version is None and model.threshold == pytest.approx(trained.model.threshold)


def test_registry_reference_without_settings_is_a_config_error():
    with pytest.raises(ConfigError):
        registry.load_model("champion")


@pytest.fixture
def store(tmp_path: Path) -> Settings:
    return Settings.from_env(tmp_path / "proj", env={})


def _register(settings: Settings, model_dir: Path, metrics: dict[str, float], champion: dict | None) -> int:
    run = tracking.open_run(settings, "train")
    version = tracking.log_and_register(settings, run, model_dir)
    champ_v = registry.champion_version(settings)
    registry.apply_decision(settings, version, decide(metrics, champion, GateParams()), champ_v, champion, run.name)
    tracking.close_run(settings, run)
    return version


def test_versions_gate_and_rollback_after_an_outside_alias_move(trained, model_dir, store):
    good = {"image_auroc": 0.9, "f1": 0.9}
    bad = {"image_auroc": 0.5, "f1": 0.1}
    assert _register(store, model_dir, good, None) == 1
    assert _register(store, model_dir, bad, good) == 2
    assert _register(store, model_dir, bad, good) == 3
    rows = {r["version"]: r for r in registry.list_versions(store)}
    assert rows[1]["aliases"] == ["champion"] and rows[3]["aliases"] == ["challenger"]
    assert rows[1]["gate"] == "promoted: no champion yet" and rows[2]["gate"].startswith("rejected: worse")
    assert rows[1]["run_name"] == "train-unversio"

    info = registry.lineage(store, 2)
    assert info["compared_with"] == "1" and info["champion_metrics"] == good
    assert registry.lineage(store, "models:/cellscan/2")["version"] == 2  # the form predict -m takes
    assert registry.lineage(store, "models:/cellscan@champion")["version"] == 1
    with pytest.raises(RegistryError, match="names 'other'; this registry's model is 'cellscan'"):
        registry.lineage(store, "models:/other@champion")
    assert "compared with champion version 1" in info["description"]

    model, version = registry.load_model("models:/cellscan/2", store)
    assert version == 2 and model.threshold == pytest.approx(trained.model.threshold)

    # Someone moves the alias in the MLflow UI to version 3: rollback goes to the last version that served.
    registry.client(store).set_registered_model_alias("cellscan", "champion", "3")
    assert registry.previous_champion(store) == 1
    assert registry.rollback(store) == 1
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(store)
    # A manual promotion of 2, then a rollback: back to 1 (3 was rolled back from).
    assert registry.promote(store, 2, "manual") == 1
    assert registry.rollback(store) == 1
    assert registry.rollback(store, 3) == 3
    assert registry.previous_champion(store) == 1  # 2 was rolled back from, 1 served
    assert registry.rollback(store, "models:/cellscan/1") == 1  # references as predict -m takes them
    assert registry.promote(store, "models:/cellscan/3", "manual") == 1 and registry.champion_version(store) == 3
    assert registry.rollback(store, "1") == 1



def test_serving_since_is_the_newest_alias_move_cellscan_recorded(trained, model_dir, store):
    """The monitor's window starts there: after a rollback, the champion's rows from before are history."""
    import time

    good = {"image_auroc": 0.9, "f1": 0.9}
    assert registry.serving_since(store) is None  # nothing registered
    t0 = time.time()
    assert _register(store, model_dir, good, None) == 1
    first = registry.serving_since(store)
    assert first is not None and t0 - 1 <= first <= time.time()
    assert _register(store, model_dir, {"image_auroc": 0.5, "f1": 0.1}, good) == 2  # rejected: no move
    assert registry.serving_since(store) == first
    time.sleep(1.1)
    registry.client(store).set_registered_model_alias("cellscan", "champion", "2")  # the UI: nothing recorded
    assert registry.serving_since(store) == first  # a lower bound: 2 took the alias after that
    time.sleep(1.1)
    assert registry.rollback(store, 1) == 1
    back = registry.serving_since(store)
    assert back >= first + 2
    time.sleep(1.1)
    assert registry.rollback(store, 1) == 1  # already the champion: no move, no new stamp
    assert registry.serving_since(store) == back

def test_a_decision_taken_against_a_champion_that_moved_meanwhile_does_not_promote(trained, model_dir, store,
                                                                                     tmp_path):
    from cellscan.core.config import Params
    from cellscan.mlops import steps

    good, better = {"image_auroc": 0.9, "f1": 0.9}, {"image_auroc": 0.95, "f1": 0.95}
    assert _register(store, model_dir, good, None) == 1
    assert _register(store, model_dir, good, good) == 2
    assert registry.champion_version(store) == 2
    run = tracking.open_run(store, "threshold")
    v3 = tracking.log_and_register(store, run, model_dir)  # a re-evaluation of 2 is scoring ...
    assert registry.rollback(store, 1) == 1  # ... when the operator rolls back to 1
    out = registry.apply_decision(store, v3, decide(better, good, GateParams()), 2, good, run.name)
    assert not out.promoted
    assert "the champion moved from version 2 to version 1" in out.reason
    assert registry.champion_version(store) == 1  # the rollback stands
    assert registry.lineage(store, v3)["aliases"] == ["challenger"]

    # A retry of the gate (a failure after the decision was written) returns it as written, without scoring
    # (the data folder does not exist) and without comparing the version with itself.
    reg = steps.Registered(v3, run.run_id, run.name, better)
    again = steps.gate(store, reg, Params(), tmp_path / "absent")
    assert (again["promoted"], again["champion"], again["champion_metrics"]) == (False, 2, good)
    assert registry.lineage(store, v3)["compared_with"] == "2"
    tracking.close_run(store, run)
    assert registry.written_decision(store, 1) is not None  # promoted and still champion
    assert registry.written_decision(store, 2) is None  # promoted, but no longer champion: the gate would run


def test_the_champion_is_scored_on_the_images_read_for_the_challenger(trained, model_dir, store, dataset_dir,
                                                                      tmp_path):
    import shutil

    from cellscan.core.data import load_dataset
    from cellscan.mlops import steps

    data = tmp_path / "cells"
    shutil.copytree(dataset_dir, data)
    _register(store, model_dir, {"image_auroc": 0.9, "f1": 0.9}, None)
    images = load_dataset(data)  # read when the training started
    max_pixels = trained.model.meta["params"]["data"]["max_pixels"]
    before = steps.champion_metrics(store, images, max_pixels)
    # An image stored while the challenger trains (a normal one uploaded as a defect) ...
    good = sorted((data / "test" / "good").iterdir())[0]
    defect = next(p for p in (data / "test").iterdir() if p.name != "good")
    shutil.copy(good, defect / "uploaded_meanwhile.png")
    # ... does not count for the champion alone; read again, the folder differs.
    assert steps.champion_metrics(store, images, max_pixels) == before
    assert steps.champion_metrics(store, data, max_pixels)[1] != before[1]


def test_finetuning_starts_afresh_when_params_change_the_network(trained, model_dir, store):
    from cellscan.mlops import steps
    from tests.conftest import tiny_params

    _register(store, model_dir, {"image_auroc": 0.9, "f1": 0.9}, None)
    assert steps.finetune_source(store, tiny_params()) is not None  # the champion's own network
    # base_filters 12 instead of 8: the champion's weights do not fit (set_weights would fail mid-flow)
    assert steps.finetune_source(store, tiny_params(**{"model.base_filters": 12})) is None
    assert steps.finetune_source(store, tiny_params(**{"model.head_depth": 3})) is None


def test_a_reevaluation_whose_gate_fails_is_not_retried_into_a_second_version(trained, model_dir, store,
                                                                             dataset_dir, monkeypatch):
    from flows.evaluate_threshold import nothing_registered
    from prefect.states import Failed

    from cellscan.mlops import steps
    from tests.conftest import tiny_params

    _register(store, model_dir, {"image_auroc": 0.9, "f1": 0.9}, None)

    def gate_down(*args, **kwargs):  # type: ignore[no-untyped-def]
        msg = "tracking server went away"
        raise ConnectionError(msg)

    real_gate = steps.gate
    monkeypatch.setattr(steps, "gate", gate_down)
    with pytest.raises(ConnectionError) as info:
        steps.reevaluate(store, tiny_params(), dataset_dir, steps.DataVersion(None, None), dataset_dir.parent)
    assert info.value.cellscan_registered == 2
    assert "version 2 was registered" in info.value.__notes__[0]
    assert not nothing_registered(None, None, Failed(data=info.value))  # Prefect does not retry it
    assert nothing_registered(None, None, Failed(data=ConnectionError("before any version")))
    # The threshold version's run logs the params its network was trained with, not params.yaml's, and
    # reproducing it says which version holds the training.
    params = tiny_params(**{"train.epochs": 9})  # the project's params.yaml changed since
    monkeypatch.setattr(steps, "gate", real_gate)
    out = steps.reevaluate(store, params, dataset_dir, steps.DataVersion(None, None), dataset_dir.parent)
    assert registry.lineage(store, out["version"])["params"]["train.epochs"] == "3"
    with pytest.raises(RegistryError, match="is version 1's network with the threshold re-evaluated"):
        steps.reproduce(store, out["version"], dataset_dir.parent)

    def close_down(*args, **kwargs):  # type: ignore[no-untyped-def]
        msg = "tracking server went away at the end"
        raise ConnectionError(msg)

    monkeypatch.setattr(steps, "close_run", close_down)  # the gate decided, closing the run failed
    with pytest.raises(ConnectionError) as info:
        steps.reevaluate(store, params, dataset_dir, steps.DataVersion(None, None), dataset_dir.parent)
    assert info.value.cellscan_registered == out["version"] + 1  # not retried into yet another version


def test_a_finetuning_run_records_the_version_it_started_from(trained, model_dir, store, tmp_path):
    from cellscan.mlops import steps
    from tests.conftest import tiny_params

    _register(store, model_dir, {"image_auroc": 0.9, "f1": 0.9}, None)
    init = steps.finetune_source(store, tiny_params())
    none = steps.DataVersion(None, None)
    run = steps.open_run(store, "retrain", tiny_params(), none, tmp_path, init_from=init)
    version = tracking.log_and_register(store, run, model_dir)
    tracking.close_run(store, run)
    assert registry.lineage(store, version)["finetuned_from"] == "1"  # reproduce starts from version 1 again
    assert registry.lineage(store, 1)["finetuned_from"] is None


def test_run_records_params_and_data_files(store, tmp_path):
    (tmp_path / "d" / "cells" / "train").mkdir(parents=True)
    (tmp_path / "d" / "cells" / "train" / "a.png").write_bytes(b"x")
    run = tracking.open_run(store, "train", params={"train": {"epochs": 3}}, data_hash="0" * 32 + ".dir",
                            dvc_file="outs:\n- md5: x\n", data_root=tmp_path / "d" / "cells", git_commit="abc")
    tracking.close_run(store, run)
    assert run.name == "train-00000000"
    assert tracking.load_params_dict(store, run.run_id) == {"train": {"epochs": 3}}
    assert tracking.load_dvc_file(store, run.run_id).startswith("outs:")
    s = tracking.run_summary(store, run.run_id)
    assert s["params"] == {"train.epochs": "3"} and s["tags"]["git_commit"] == "abc"
    assert s["datasets"][0]["digest"] == "0" * 32 + ".dir" and s["status"] == "FINISHED"


def test_write_result_is_atomic_json(tmp_path):
    from flows.common import write_result

    target = tmp_path / "sub" / "result.json"
    write_result(target, {"version": 3, "promoted": True})
    assert json.loads(target.read_text()) == {"version": 3, "promoted": True}
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_restore_into_brings_back_an_old_data_version_beside_the_project(tmp_path):
    from cellscan.mlops import versioning

    project = tmp_path / "proj"
    (project / "data" / "cells").mkdir(parents=True)
    (project / "data" / "cells" / "a.txt").write_text("a")
    versioning.init_repo(project, tmp_path / "remote")
    old = versioning.snapshot(project)
    old_dvc = (project / "data.dvc").read_text()
    (project / "data" / "cells" / "b.txt").write_text("b")
    new = versioning.snapshot(project)
    assert new != old

    assert versioning.restore_into(project, old_dvc, tmp_path / "work") == old
    assert sorted(p.name for p in (tmp_path / "work" / "data" / "cells").iterdir()) == ["a.txt"]
    assert versioning.data_hash(project) == new  # the project keeps its data version
    assert (project / "data" / "cells" / "b.txt").is_file()
    # With the local cache gone, the files come from the remote.
    import shutil

    shutil.rmtree(project / ".dvc" / "cache")
    assert versioning.restore_into(project, old_dvc, tmp_path / "work2") == old
    assert (tmp_path / "work2" / "data" / "cells" / "a.txt").read_text() == "a"


def test_a_store_that_does_not_answer_is_not_read_as_an_empty_registry(tmp_path, monkeypatch):
    """champion_version None means "no champion": a gate would then promote without comparing, and a
    rollback would say there is nothing to go back to. A server that does not answer is MLflow's error."""
    import socket

    from mlflow.exceptions import MlflowException

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    settings = Settings.from_env(tmp_path, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    from cellscan.mlops.monitor.reference import load_reference

    for call in (registry.champion_version, registry.rollback, registry.previous_champion,
                 lambda s: registry.load_model(registry.CHAMPION, s), lambda s: registry.promote(s, 1),
                 lambda s: load_reference(s, 1)):
        with pytest.raises(MlflowException, match=f"127.0.0.1:{port}"):
            call(settings)


def test_an_empty_store_still_reads_as_no_champion(store, trained, model_dir):
    run = tracking.open_run(store, "train")
    tracking.log_and_register(store, run, model_dir)
    tracking.close_run(store, run)
    assert registry.champion_version(store) is None
    with pytest.raises(RegistryError, match="has no version or alias 'champion'"):
        registry.load_model(registry.CHAMPION, store)
    with pytest.raises(RegistryError, match="no version or alias 7"):
        registry.promote(store, 7)
    from cellscan.mlops.monitor.reference import load_reference

    with pytest.raises(RegistryError, match="version 1 of 'cellscan' has no reference"):
        load_reference(store, 1)  # registered without one: the store answered that it lacks it


def test_data_outside_the_versioned_folder_is_recorded_as_unversioned_not_as_another(tmp_path, caplog):
    from cellscan.mlops import versioning
    from cellscan.mlops.steps import version_data

    project = tmp_path / "proj"
    (project / "data" / "cells").mkdir(parents=True)
    (project / "data" / "cells" / "a.txt").write_text("a")
    (tmp_path / "nas" / "scans").mkdir(parents=True)
    versioning.init_repo(project, tmp_path / "remote")
    inside = version_data(project, project / "data" / "cells", push=False)
    assert inside.hash is not None
    assert inside.hash == versioning.data_hash(project)
    (project / "data" / "cells" / "b.txt").write_text("b")  # in the folder DVC versions, not trained on
    for elsewhere in (tmp_path / "nas" / "scans", project / "scans", project / "data-2"):
        got = version_data(project, elsewhere, push=False)
        assert (got.hash, got.dvc_file) == (None, None), elsewhere
        assert f"data.root {elsewhere} lies outside {project / 'data'}" in caplog.text
    assert versioning.data_hash(project) == inside.hash  # nothing recorded for those runs


def test_pull_tells_a_version_the_remote_lacks_from_a_remote_that_fails(tmp_path, monkeypatch, capsys):
    import shutil

    from cellscan.errors import VersioningError
    from cellscan.mlops import versioning

    project = tmp_path / "proj"
    (project / "data" / "cells").mkdir(parents=True)
    (project / "data" / "cells" / "a.txt").write_text("a")
    versioning.init_repo(project, tmp_path / "remote")
    versioning.snapshot(project)
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    assert versioning.pull(project)  # from the remote
    assert (project / "data" / "cells" / "a.txt").read_text() == "a"
    dvc_file = project / "data.dvc"
    dvc_file.write_text(dvc_file.read_text().replace(dvc_file.read_text().split("md5: ")[1][:32], "0" * 32))
    assert not versioning.pull(project)  # a version neither the cache nor the remote holds: regenerate
    (tmp_path / "not-a-folder").write_text("")
    versioning.dvc("remote", "modify", "local", "url", str(tmp_path / "not-a-folder"), cwd=project)
    with pytest.raises(VersioningError, match="dvc pull data.dvc` failed"):  # not "missing": nothing replaced
        versioning.pull(project)
    monkeypatch.chdir(project)  # as the set-up scripts call it: one line, exit 1 (3: regenerate the data)
    assert versioning.main(["pull"]) == 1
    assert capsys.readouterr().err.startswith("data: `dvc pull data.dvc` failed")



def test_an_http_remote_that_does_not_answer_is_not_an_empty_one(tmp_path):
    """DVC reports the files of an HTTP remote it cannot reach as missing: the set-up would then make a new
    data version in place of the one data.dvc names."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cellscan.errors import VersioningError
    from cellscan.mlops import versioning

    project = tmp_path / "proj"
    (project / "data" / "cells").mkdir(parents=True)
    (project / "data" / "cells" / "a.txt").write_text("a")
    versioning.init_repo(project)
    versioning.snapshot(project, push=False)
    dvc_file = project / "data.dvc"
    dvc_file.write_text(dvc_file.read_text().replace(dvc_file.read_text().split("md5: ")[1][:32], "0" * 32))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    versioning.dvc("remote", "add", "-d", "web", f"http://reader:s3cret@127.0.0.1:{port}/dvc", cwd=project)
    with pytest.raises(VersioningError, match=rf"remote .web. \(http://127.0.0.1:{port}/dvc\) does") as err:
        versioning.pull(project)
    assert "s3cret" not in str(err.value)  # the password stays DVC's

    class Empty(BaseHTTPRequestHandler):  # a remote that answers and holds nothing
        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(404)
            self.end_headers()

        do_GET = do_HEAD  # noqa: N815

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Empty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        versioning.dvc("remote", "modify", "web", "url",
                       f"http://reader:s3cret@127.0.0.1:{server.server_address[1]}/dvc", cwd=project)
        assert versioning.pull(project) is False  # missing: the set-up may regenerate
    finally:
        server.shutdown()

def test_pyfunc_scales_integer_batches_and_refuses_raw_float_counts(trained, dataset_dir):
    import numpy as np

    from cellscan.core.images import load_batch
    from cellscan.errors import ImageError
    from cellscan.mlops.pyfunc import CellscanPyfunc

    pf = CellscanPyfunc()
    pf.model = trained.model
    x = load_batch(sorted((dataset_dir / "test" / "good").glob("*.png"))[:2], size=pf.model.shape, channels=1)
    want = pf.predict(None, x)["anomaly_score"].to_numpy()
    as16 = np.round(x * 65535).astype(np.uint16)  # a 16-bit CT batch, as a caller of the pyfunc sends it
    np.testing.assert_allclose(pf.predict(None, as16)["anomaly_score"].to_numpy(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ImageError, match=r"from \d+ to \d+ \(or not finite\); expected pixels in \[0, 1\]"):
        pf.predict(None, as16.astype(np.float32))
    with pytest.raises(ImageError, match="dtype int32; expected float pixels in"):
        pf.predict(None, as16.astype(np.int32))
