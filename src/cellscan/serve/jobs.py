"""Training jobs of the service, executed outside its process, one at a time.

The service never trains: ``/retrain`` and ``/anomaly`` store their image, then queue a job here.
A job is a run of a flow in another process:

- :class:`SubprocessRunner` (no Prefect server configured: tests, the embedded default) starts
  ``python -m flows.retrain --project DIR --result FILE`` (or ``flows.evaluate_threshold``) in the
  repository folder and reads the flow's result from FILE;
- :class:`PrefectRunner` (``PREFECT_API_URL`` set) starts a run of the matching deployment with
  ``run_deployment(..., timeout=0)``, executed by a Prefect worker, and polls its state.

:class:`Jobs` keeps the queue: one job runs at a time (a background thread waits for it: it only
waits, the training happens elsewhere), and at most ``max_pending`` jobs are queued or running;
past that :meth:`Jobs.reserve` raises :class:`BusyError` (HTTP 429). This module imports no flow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cellscan.errors import BusyError, JobError
from cellscan.settings import Settings

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed")
# The keys of the original /retrain and /anomaly answers, copied from the flow's result.
RESULT_KEYS = ("new_validation_error", "new_anomaly_error", "threshold", "version", "promoted", "reason")


@dataclass(frozen=True)
class FlowSpec:
    """Where a job kind's flow lives: a module run with ``python -m``, and a Prefect deployment."""

    module: str
    deployment: str
    parameters: dict[str, Any] = field(default_factory=dict)


# Deployment names: flows/deploy.py registers them (``python -m flows.deploy``).
RETRAIN_DEPLOYMENT = "service-retrain"
EVALUATE_DEPLOYMENT = "service-evaluate-threshold"
FLOWS: dict[str, FlowSpec] = {
    "retrain": FlowSpec("flows.retrain", f"retrain/{RETRAIN_DEPLOYMENT}"),
    "anomaly": FlowSpec("flows.evaluate_threshold", f"evaluate-threshold/{EVALUATE_DEPLOYMENT}"),
}


@dataclass
class Job:
    id: str
    kind: str
    status: str = "queued"  # queued | running | done | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    pid: int | None = None  # the child process (subprocess runner)
    flow_run_id: str | None = None  # the Prefect flow run (Prefect runner)
    flow_run_state: str | None = None  # its last state seen (Scheduled, Pending, Running, ...)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def pending(self) -> bool:
        return self.status in ("queued", "running")

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "status": self.status, "created": self.created,
                "started": self.started, "finished": self.finished, "result": self.result, "error": self.error,
                "pid": self.pid, "flow_run_id": self.flow_run_id, "flow_run_state": self.flow_run_state}

    def answer(self) -> dict[str, Any]:
        """The original contract's keys (``new_validation_error``, ..., ``reason``) from the result."""
        res = self.result or {}
        return {k: res[k] for k in RESULT_KEYS if k in res}


class Runner(Protocol):
    """Runs one job to its end outside this process; returns the flow's result or raises JobError."""

    def run(self, job: Job) -> dict[str, Any]: ...

    def stop(self) -> None: ...


def child_env(settings: Settings, repo: Path, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a flow process: ``base`` with the service's settings passed through.

    The project, tracking server and model name come from ``settings`` (so the child uses what the
    service uses), the repository is on PYTHONPATH, and the API key is left out (flows need none).
    """
    env = {k: v for k, v in base.items() if k not in ("CELLSCAN_API_KEY", "CELLSCAN_API_KEY_FILE")}
    path = [str(repo), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(repo)]]
    env |= {
        "CELLSCAN_HOME": str(settings.home),
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "CELLSCAN_MODEL_NAME": settings.model_name,
        "PYTHONPATH": os.pathsep.join(path),
    }
    if settings.prefect_api_url:
        env["PREFECT_API_URL"] = settings.prefect_api_url
    return env


def _tail(path: Path, lines: int = 4, chars: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-chars:]


class SubprocessRunner:
    """Runs a flow as ``python -m <module> --project DIR --result FILE`` in a child process.

    The child runs in ``repo`` (where ``flows/`` is) in its own session, with its output in
    ``workdir/<job id>.log``. It is killed (its whole process group) after ``timeout_s``.
    """

    def __init__(self, settings: Settings, repo: Path, base_env: Mapping[str, str], workdir: Path,
                 *, timeout_s: float | None = None, python: str = sys.executable,
                 flows: Mapping[str, FlowSpec] = FLOWS) -> None:
        self.settings = settings
        self.repo = Path(repo).resolve()
        self.env = child_env(settings, self.repo, base_env)
        self.workdir = Path(workdir)
        self.timeout_s = settings.job_timeout_s if timeout_s is None else timeout_s
        self.python = python
        self.flows = dict(flows)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def command(self, kind: str, result_file: Path) -> list[str]:
        spec = self.flows.get(kind)
        if spec is None:
            msg = f"unknown job kind {kind!r}; expected one of {sorted(self.flows)}"
            raise JobError(msg)
        return [self.python, "-m", spec.module, "--project", str(self.settings.home), "--result", str(result_file)]

    def run(self, job: Job) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        result_file = self.workdir / f"{job.id}.json"
        log_file = self.workdir / f"{job.id}.log"
        cmd = self.command(job.kind, result_file)
        with log_file.open("wb") as log:
            try:
                proc = subprocess.Popen(cmd, cwd=self.repo, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                msg = f"{job.kind}: could not start {cmd[0]} -m {cmd[2]}: {exc}"
                raise JobError(msg) from None
            job.pid = proc.pid
            self._procs[job.id] = proc
            try:
                rc = proc.wait(self.timeout_s)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                msg = f"{job.kind} took longer than {self.timeout_s:g} s and was stopped (log: {log_file})"
                raise JobError(msg) from None
            finally:
                self._procs.pop(job.id, None)
        if rc != 0:
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
            msg = f"{job.kind} process {how}: {_tail(log_file) or 'no output'} (log: {log_file})"
            raise JobError(msg)
        try:
            out = json.loads(result_file.read_text())
        except (OSError, ValueError) as exc:
            msg = f"{job.kind} process finished without a readable result in {result_file}: {exc}"
            raise JobError(msg) from None
        if not isinstance(out, dict):
            msg = f"{job.kind} result is not a JSON object: {str(out)[:200]}"
            raise JobError(msg)
        return out

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(10)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        """Stop the running children (service shutdown)."""
        for proc in list(self._procs.values()):
            self._kill(proc)


class PrefectRunner:
    """Runs a flow as a run of its Prefect deployment (executed by a worker) and polls its state."""

    FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    def __init__(self, settings: Settings, *, poll_s: float = 2.0, timeout_s: float | None = None,
                 flows: Mapping[str, FlowSpec] = FLOWS) -> None:
        self.settings = settings
        self.poll_s = poll_s
        self.timeout_s = settings.job_timeout_s if timeout_s is None else timeout_s
        self.flows = dict(flows)

    def run(self, job: Job) -> dict[str, Any]:
        return asyncio.run(self._run(job))

    def parameters(self, kind: str) -> dict[str, Any]:
        return {"project": str(self.settings.home)} | self.flows[kind].parameters

    async def _run(self, job: Job) -> dict[str, Any]:
        # Talk to the server the settings name, whatever Prefect context the process has entered before.
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.settings.prefect_api_url}):
            return await self._run_on_server(job)

    async def _run_on_server(self, job: Job) -> dict[str, Any]:
        from prefect.client.orchestration import get_client
        from prefect.deployments import arun_deployment
        from prefect.exceptions import ObjectNotFound

        spec = self.flows.get(job.kind)
        if spec is None:
            msg = f"unknown job kind {job.kind!r}; expected one of {sorted(self.flows)}"
            raise JobError(msg)
        try:
            run = await arun_deployment(name=spec.deployment, parameters=self.parameters(job.kind), timeout=0,
                                        tags=["cellscan-service"])
        except ObjectNotFound:
            msg = (f"Prefect deployment {spec.deployment!r} not found at {self.settings.prefect_api_url}; "
                   "register it with `python -m flows.deploy`")
            raise JobError(msg) from None
        except Exception as exc:  # the server is down, refuses, ...
            msg = f"could not start Prefect deployment {spec.deployment!r}: {type(exc).__name__}: {exc}"
            raise JobError(msg) from None
        job.flow_run_id = str(run.id)
        deadline = time.monotonic() + self.timeout_s
        async with get_client() as client:
            while True:
                fr = await client.read_flow_run(run.id)
                state = fr.state
                job.flow_run_state = state.name if state is not None else None
                if state is not None and state.type.value in self.FINAL:
                    break
                if time.monotonic() > deadline:
                    msg = (f"Prefect flow run {run.id} not finished after {self.timeout_s:g} s (state "
                           f"{job.flow_run_state}; is a worker running on the deployment's pool?)")
                    raise JobError(msg)
                await asyncio.sleep(self.poll_s)
        if state.type.value != "COMPLETED":
            msg = f"Prefect flow run {run.id} ({spec.deployment}) ended {state.name}: {state.message or ''}".strip()
            raise JobError(msg)
        try:
            out = await state.aresult(raise_on_failure=False)  # type: ignore[call-overload]
        except Exception as exc:  # result not persisted or not readable here
            logger.warning("flow run %s: result not readable (%s); reading the registry instead", run.id, exc)
            out = None
        return out if isinstance(out, dict) else self._from_registry()

    def _from_registry(self) -> dict[str, Any]:
        """The newest registered version and its run's metrics, when the flow run's result cannot be read."""
        from cellscan.mlops import registry

        rows = registry.list_versions(self.settings)
        if not rows:
            return {}
        row = rows[0]
        metrics: dict[str, float] = {}
        if row.get("run_id"):
            try:
                metrics = dict(registry.client(self.settings).get_run(row["run_id"]).data.metrics)
            except Exception as exc:  # noqa: BLE001 (a best-effort summary)
                logger.warning("run %s of version %s unreadable: %s", row["run_id"], row["version"], exc)
        return {"version": row["version"], "new_validation_error": metrics.get("validation_error"),
                "new_anomaly_error": metrics.get("anomaly_error"), "promoted": "champion" in row["aliases"],
                "reason": row.get("gate") or "read from the registry (the flow run's result was not persisted)"}

    def stop(self) -> None:
        pass


def make_runner(settings: Settings, repo: Path, base_env: Mapping[str, str], workdir: Path) -> Runner:
    """A Prefect runner where a Prefect server is configured, else a child-process runner."""
    if settings.prefect_api_url:
        return PrefectRunner(settings)
    return SubprocessRunner(settings, repo, base_env, workdir)


class Jobs:
    """A bounded queue of training jobs, run one at a time in submission order.

    ``reserve`` takes a slot (or raises BusyError) before anything is stored, ``start`` queues the
    job, ``discard`` gives the slot back when the request fails before starting. ``on_done`` is
    called after every job (the service refreshes its champion there).
    """

    def __init__(self, runner: Runner, max_pending: int = 2, *, on_done: Callable[[Job], None] | None = None,
                 keep: int = 200, retry_after_s: int = 60) -> None:
        if max_pending < 1:
            msg = f"max_pending must be at least 1, got {max_pending}"
            raise JobError(msg)
        self.runner = runner
        self.max_pending = max_pending
        self.on_done = on_done
        self.retry_after_s = retry_after_s
        self._jobs: dict[str, Job] = {}
        self._order: deque[str] = deque()
        self._keep = keep
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="jobs")
        self._thread.start()

    # -- submitting ---------------------------------------------------------------------------
    def pending(self) -> int:
        with self._lock:
            return sum(j.pending for j in self._jobs.values())

    def reserve(self, kind: str) -> Job:
        """A queued job holding one of the ``max_pending`` slots; BusyError when none is free."""
        with self._lock:
            busy = sum(j.pending for j in self._jobs.values())
            if busy >= self.max_pending:
                msg = (f"{busy} trainings are already queued or running (limit {self.max_pending}); "
                       f"retry in about {self.retry_after_s} s")
                raise BusyError(msg)
            job = Job(uuid.uuid4().hex[:12], kind)
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._forget_old()
        return job

    def start(self, job: Job) -> Job:
        self._queue.put(job)
        return job

    def submit(self, kind: str) -> Job:
        return self.start(self.reserve(kind))

    def discard(self, job: Job) -> None:
        """Give back a reserved job that was never started."""
        with self._lock:
            self._jobs.pop(job.id, None)
            if job.id in self._order:
                self._order.remove(job.id)

    def _forget_old(self) -> None:
        while len(self._order) > self._keep:
            old = self._jobs.get(self._order[0])
            if old is not None and old.pending:
                break
            self._jobs.pop(self._order.popleft(), None)

    # -- looking -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until the job ends (True) or ``timeout`` passes (False). Not for an event loop."""
        return job._done.wait(timeout)

    async def wait_async(self, job: Job, timeout: float | None = None, every: float = 0.25) -> bool:
        """Wait on an event loop without holding a thread: True when the job ended in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job._done.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(every)
        return True

    # -- running -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: Job) -> None:
        job.status, job.started = "running", time.time()
        status, error, result = "done", None, None
        try:
            result = self.runner.run(job)
        except Exception as exc:
            status = "failed"
            error = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
            logger.error("job %s (%s) failed: %s", job.id, job.kind, error)
        job.result, job.error = result, error
        if self.on_done is not None:  # before the job reads as finished: "done" means served
            try:
                self.on_done(job)
            except Exception:
                logger.exception("after job %s", job.id)
        job.finished, job.status = time.time(), status
        job._done.set()

    def close(self) -> None:
        """Stop taking jobs and stop the running one."""
        self._queue.put(None)
        self.runner.stop()
