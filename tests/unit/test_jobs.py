"""The service's job runner: flows run as child processes, one at a time, bounded, failures reported."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from cellscan.errors import BusyError, JobError
from cellscan.serve.fetch import FetchPolicy
from cellscan.serve.jobs import FlowSpec, Job, Jobs, PrefectRunner, SubprocessRunner, child_env, make_runner
from cellscan.settings import Settings

# A fake "flows" package: each module takes --project and --result like the real entry points.
FAKE = {
    "ok.py": """
import argparse, json, os, sys
ap = argparse.ArgumentParser(); ap.add_argument("--project"); ap.add_argument("--result")
a = ap.parse_args()
out = {"pid": os.getpid(), "cwd": os.getcwd(), "project": a.project, "version": 2, "promoted": True,
       "reason": "better", "new_validation_error": 0.1, "new_anomaly_error": 0.5, "extra": 1,
       "env": {k: os.environ.get(k) for k in ("CELLSCAN_HOME", "MLFLOW_TRACKING_URI", "CELLSCAN_API_KEY", "KEEP")},
       "path0": sys.path[0]}
json.dump(out, open(a.result, "w"))
""",
    "fail.py": """
import sys
print("loading data ...")
print("DatasetError: no images in data/cells/train", file=sys.stderr)
sys.exit(3)
""",
    "slow.py": "import time\ntime.sleep(30)\n",
    "noresult.py": "print('done, but no result written')\n",
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "fakeflows").mkdir(parents=True)
    (root / "fakeflows" / "__init__.py").write_text("")
    for name, text in FAKE.items():
        (root / "fakeflows" / name).write_text(text)
    return root


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    env = {"CELLSCAN_HOME": str(tmp_path / "proj"), "MLFLOW_TRACKING_URI": "sqlite:////tmp/x.db",
           "CELLSCAN_API_KEY": "k", "CELLSCAN_JOB_TIMEOUT": "60"}
    return Settings.from_env(env=env)


FLOWS = {k: FlowSpec(f"fakeflows.{k}", f"x/{k}") for k in ("ok", "fail", "slow", "noresult")}


def _runner(settings: Settings, repo: Path, tmp_path: Path, **kw: object) -> SubprocessRunner:
    base = {"PATH": os.environ.get("PATH", ""), "CELLSCAN_API_KEY": "k", "KEEP": "yes", "PYTHONPATH": "/elsewhere"}
    return SubprocessRunner(settings, repo, base, tmp_path / "jobs", flows=FLOWS, **kw)  # type: ignore[arg-type]


def test_a_job_runs_in_a_child_process_in_the_repo_with_the_settings(settings, repo, tmp_path):
    jobs = Jobs(_runner(settings, repo, tmp_path))
    job = jobs.submit("ok")
    assert jobs.wait(job, 30)
    assert job.status == "done", job.error
    res = job.result
    assert res["pid"] == job.pid != os.getpid()
    assert Path(res["cwd"]) == repo.resolve() and res["path0"] == str(repo.resolve())
    assert res["project"] == str(settings.home)
    assert res["env"] == {"CELLSCAN_HOME": str(settings.home), "MLFLOW_TRACKING_URI": "sqlite:////tmp/x.db",
                          "CELLSCAN_API_KEY": None, "KEEP": "yes"}
    assert job.answer() == {"new_validation_error": 0.1, "new_anomaly_error": 0.5, "version": 2, "promoted": True,
                            "reason": "better"}
    view = jobs.get(job.id).view()
    assert view["status"] == "done" and view["flow_run_id"] is None and view["finished"] >= view["started"]


def test_a_failing_child_fails_the_job_with_its_error(settings, repo, tmp_path):
    jobs = Jobs(_runner(settings, repo, tmp_path))
    job = jobs.submit("fail")
    assert jobs.wait(job, 30)
    assert job.status == "failed" and job.result is None
    assert "exited with status 3" in job.error and "DatasetError: no images" in job.error


def test_a_child_without_a_result_fails_the_job(settings, repo, tmp_path):
    jobs = Jobs(_runner(settings, repo, tmp_path))
    job = jobs.submit("noresult")
    assert jobs.wait(job, 30)
    assert job.status == "failed" and "without a readable result" in job.error


def test_a_killed_child_fails_the_job(settings, repo, tmp_path):
    jobs = Jobs(_runner(settings, repo, tmp_path))
    job = jobs.submit("slow")
    for _ in range(100):
        if job.pid:
            break
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    assert jobs.wait(job, 30)
    assert job.status == "failed" and "killed by SIGKILL" in job.error


def test_a_child_past_the_timeout_is_stopped(settings, repo, tmp_path):
    jobs = Jobs(_runner(settings, repo, tmp_path, timeout_s=1))
    t0 = time.monotonic()
    job = jobs.submit("slow")
    assert jobs.wait(job, 30)
    assert time.monotonic() - t0 < 15
    assert job.status == "failed" and "longer than 1 s" in job.error
    with pytest.raises(ProcessLookupError):
        os.kill(job.pid, 0)


def test_jobs_run_one_at_a_time_in_order_and_the_queue_is_bounded(settings, repo, tmp_path):
    done: list[tuple[str, str]] = []
    jobs = Jobs(_runner(settings, repo, tmp_path), max_pending=2,
                on_done=lambda j: done.append((j.id, j.status)))
    a, b = jobs.submit("ok"), jobs.submit("ok")
    with pytest.raises(BusyError, match="limit 2"):
        jobs.reserve("ok")
    assert jobs.pending() == 2
    assert jobs.wait(a, 30) and jobs.wait(b, 30)
    assert a.finished <= b.started
    # on_done runs before the job reads as finished (the service refreshes its champion there)
    assert done == [(a.id, "running"), (b.id, "running")]
    assert jobs.pending() == 0
    jobs.submit("ok")  # slots are free again


def test_a_reserved_job_can_be_given_back(settings, repo, tmp_path):
    jobs = Jobs(_runner(settings, repo, tmp_path), max_pending=1)
    job = jobs.reserve("ok")
    with pytest.raises(BusyError):
        jobs.reserve("ok")
    jobs.discard(job)
    assert jobs.get(job.id) is None
    assert jobs.reserve("ok").status == "queued"


def test_wait_async_does_not_block_the_event_loop(settings, repo, tmp_path):
    jobs = Jobs(_runner(settings, repo, tmp_path))
    job = jobs.submit("slow")

    async def main() -> tuple[bool, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.05)

        t = asyncio.get_running_loop().create_task(tick())
        ended = await jobs.wait_async(job, timeout=1.0, every=0.1)
        t.cancel()
        return ended, ticks

    ended, ticks = asyncio.run(main())
    assert not ended and ticks >= 10
    jobs.close()
    assert jobs.wait(job, 30) and job.status == "failed"


def test_unknown_kind_and_bad_limit(settings, repo, tmp_path):
    jobs = Jobs(_runner(settings, repo, tmp_path))
    job = jobs.submit("nope")
    assert jobs.wait(job, 10) and "unknown job kind 'nope'" in job.error
    with pytest.raises(JobError):
        Jobs(_runner(settings, repo, tmp_path), max_pending=0)


def test_the_runner_follows_the_settings(settings, repo, tmp_path):
    assert isinstance(make_runner(settings, repo, {}, tmp_path), SubprocessRunner)
    with_prefect = Settings.from_env(env={"CELLSCAN_HOME": str(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    runner = make_runner(with_prefect, repo, {}, tmp_path)
    assert isinstance(runner, PrefectRunner)
    assert runner.parameters("retrain") == {"project": str(tmp_path.resolve())}
    env = child_env(with_prefect, repo, {"PYTHONPATH": f"/a{os.pathsep}{repo}"})
    assert env["PYTHONPATH"] == f"{repo}{os.pathsep}/a" and env["PREFECT_API_URL"] == "http://127.0.0.1:9/api"


def test_a_prefect_run_that_cannot_start_fails_the_job(tmp_path, monkeypatch):
    s = Settings.from_env(env={"CELLSCAN_HOME": str(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    jobs = Jobs(PrefectRunner(s))
    job = jobs.submit("retrain")
    assert jobs.wait(job, 60)
    assert job.status == "failed" and "could not start Prefect deployment 'retrain/service-retrain'" in job.error


def test_fetch_policy_from_settings(tmp_path):
    s = Settings.from_env(env={"CELLSCAN_HOME": str(tmp_path), "CELLSCAN_URL_ALLOWLIST": "10.0.0.0/8, a:1",
                               "CELLSCAN_FILE_URL_DIR": str(tmp_path), "CELLSCAN_FETCH_TIMEOUT": "2",
                               "CELLSCAN_FETCH_MAX_BYTES": "100"})
    p = FetchPolicy.from_settings(s)
    assert p.allow == ("10.0.0.0/8", "a:1") and p.file_dir == tmp_path.resolve()
    assert (p.timeout_s, p.max_bytes) == (2.0, 100)


def test_job_view_has_the_states():
    j = Job("x", "retrain")
    assert j.view()["status"] == "queued" and j.pending and j.answer() == {}
