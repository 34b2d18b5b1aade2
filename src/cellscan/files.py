"""Writing files and folders so that a reader never sees half of one and a failed write loses nothing.

A file is written beside its target and renamed over it (:func:`write_atomic`); a folder is built beside its
target (:func:`cellscan.core.bundle.staging_dir`) and swapped in (:func:`swap_in`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes, sync: bool = True) -> Path:
    """Write ``data`` to ``path``: a temporary file in the same folder, flushed to disk (``sync``), then
    renamed over it. Where the write fails (a full disk), the earlier file is still whole and no temporary
    file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a report from the service's user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def swap_in(new: Path, target: Path) -> Path:
    """Rename the folder ``new`` (a sibling of ``target``) to ``target``, replacing an earlier folder there.

    The earlier one is renamed aside first and deleted only once the new one is in place; where the new one
    cannot be renamed in, the earlier one is put back. ``target`` is never left half-deleted.
    """
    if not target.exists():
        new.rename(target)
        return target
    old = target.with_name(f".{target.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
