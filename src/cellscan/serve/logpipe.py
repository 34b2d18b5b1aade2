"""Copy a process's output into a log file that rotates by size: ``cmd 2>&1 | python -m cellscan.serve.logpipe FILE``.

scripts/services.sh runs every long-lived service through it, so a log never grows without bound:
past ``--max-bytes`` (10 MiB) the file becomes FILE.1 (FILE.1 becomes FILE.2, ...), ``--keep`` (5) old
files are kept. Lines are written as they come (flushed), so ``tail -f`` works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import BinaryIO


def _rotate(path: Path, keep: int) -> None:
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    if path.exists():
        path.replace(path.with_name(f"{path.name}.1"))


def pipe(source: BinaryIO, path: Path, max_bytes: int = 10 * 1024 * 1024, keep: int = 5) -> None:
    """Copy ``source`` line by line into ``path``, rotating past ``max_bytes``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = path.open("ab")
    size = out.tell()
    for line in source:
        if size + len(line) > max_bytes and size > 0:
            out.close()
            _rotate(path, keep)
            out, size = path.open("ab"), 0
        out.write(line)
        out.flush()
        size += len(line)
    out.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file", type=Path)
    ap.add_argument("--max-bytes", type=int, default=10 * 1024 * 1024)
    ap.add_argument("--keep", type=int, default=5)
    a = ap.parse_args()
    pipe(sys.stdin.buffer, a.file, a.max_bytes, a.keep)


if __name__ == "__main__":
    main()
