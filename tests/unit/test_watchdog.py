"""The flow watchdog: a process killed with SIGKILL leaves no child behind; a normal end leaves them alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and SIGKILL as on Linux")

PARENT = """
import subprocess, sys, time
from cellscan.mlops import watchdog
dog = watchdog.start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
time.sleep(1.5)   # the watchdog polls the children twice a second
print(child.pid, flush=True)
if sys.argv[1] == "close":
    dog.close()
    sys.exit(0)
time.sleep(120)
"""


def _parent(how: str) -> tuple[subprocess.Popen[str], psutil.Process]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, how], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = psutil.Process(int(proc.stdout.readline()))
    return proc, child


def test_sigkill_of_the_parent_stops_its_children():
    proc, child = _parent("kill")
    assert child.is_running()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    gone, _ = psutil.wait_procs([child], timeout=20)
    assert gone, "the child outlived its killed parent"


def test_a_normal_end_leaves_the_children_alone():
    proc, child = _parent("close")
    assert proc.wait(timeout=20) == 0
    time.sleep(1.5)
    try:
        assert child.is_running(), "the watchdog stopped a child after a normal end"
    finally:
        child.kill()
