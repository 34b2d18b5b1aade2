"""Clean up after a flow process that dies without cleaning up itself (kill -9, the OOM killer).

A flow started from the command line without ``PREFECT_API_URL`` runs against a temporary Prefect API
server that Prefect starts as a child process and stops when the flow process exits normally. Killed
with SIGKILL, the flow process can do neither: its flow run stays ``Running`` for good and the server
lives on. :func:`start` launches a small watchdog process, in a session of its own, holding the read
end of a pipe from the flow process. It remembers the flow process's descendants as they appear; when
the pipe closes without the flow process having said it finished, the flow process is gone, and the
watchdog marks the reported flow run ``Crashed`` (through the API server, which is still up) and then
stops the descendants it saw.

Example:
    >>> dog = start()                       # in the flow process, before the flow runs
    >>> dog.report("0b6c...", "http://127.0.0.1:8419/api")   # doctest: +SKIP
    >>> dog.close()                         # normal end: the watchdog exits and touches nothing
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from typing import IO, Any

log = logging.getLogger(__name__)
POLL_S = 0.5


class Watchdog:
    """The flow process's end of the pipe."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def _say(self, line: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            log.warning("the flow watchdog is gone; a killed flow would not be cleaned up")

    def report(self, flow_run_id: str, api_url: str) -> None:
        """The flow run to mark ``Crashed`` should this process die, and the API that holds it."""
        self._say(f"run {flow_run_id} {api_url}")

    def close(self) -> None:
        """Normal end: the watchdog exits without touching anything."""
        self._say("done")
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def start() -> Watchdog:
    """Launch the watchdog of this process (see the module's text)."""
    proc = subprocess.Popen([sys.executable, "-m", "cellscan.mlops.watchdog", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    return Watchdog(proc)


def prefect_hook(dog: Watchdog) -> Any:
    """An ``on_running`` hook for a Prefect flow that reports its run and API to ``dog``."""

    def report_to_watchdog(flow: Any, flow_run: Any, state: Any) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            dog.report(str(flow_run.id), str(client.api_url).rstrip("/"))

    return report_to_watchdog


# --- the watchdog process ---------------------------------------------------------------------------


def _mark_crashed(flow_run_id: str, api_url: str) -> bool:
    import httpx

    body = {"state": {"type": "CRASHED", "name": "Crashed",
                      "message": "The flow process ended without reporting (killed: SIGKILL or out of memory)."},
            "force": True}
    try:
        r = httpx.post(f"{api_url}/flow_runs/{flow_run_id}/set_state", json=body, timeout=20)
    except httpx.HTTPError as exc:
        print(f"cellscan watchdog: could not mark flow run {flow_run_id} crashed: {exc}", file=sys.stderr)
        return False
    return r.status_code < 300


def _stop(procs: list[Any]) -> None:
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def watch(parent: int, pipe: IO[bytes]) -> int:
    """Follow ``parent`` until ``pipe`` closes; clean up if it closed without a ``done`` line."""
    import psutil

    said: dict[str, Any] = {"done": False, "run": None}
    closed = threading.Event()

    def read() -> None:
        for raw in pipe:
            words = raw.decode(errors="replace").split()
            if words[:1] == ["done"]:
                said["done"] = True
            elif len(words) == 3 and words[0] == "run":
                said["run"] = (words[1], words[2])
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    seen: dict[int, Any] = {}
    try:
        me = psutil.Process(parent)
    except psutil.Error:
        return 0
    while not closed.wait(POLL_S):
        try:
            for p in me.children(recursive=True):
                if p.pid != os.getpid():
                    seen.setdefault(p.pid, p)  # psutil.Process checks its creation time: a reused pid is not ours
        except psutil.Error:
            pass
    if said["done"]:
        return 0
    if said["run"] is not None:
        _mark_crashed(*said["run"])
    left = [p for p in seen.values() if p.is_running()]
    _stop(left)
    print(f"cellscan watchdog: flow process {parent} died; flow run "
          f"{said['run'][0] if said['run'] else '(none started)'} marked crashed, {len(left)} process(es) stopped",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(watch(int(sys.argv[1]), sys.stdin.buffer))
