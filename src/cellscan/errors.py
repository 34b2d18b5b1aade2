"""Every error cellscan raises on purpose, in one hierarchy.

Hierarchy::

    CellscanError
    ├── ImageError        an input is not a usable image (format, size, mode, truncation, non-finite pixels)
    ├── DatasetError      a dataset folder is missing or does not follow a known layout
    ├── ConfigError       params.yaml, a setting or an argument is out of range
    ├── ModelError        a model bundle is missing, incomplete or incompatible
    │   └── ParityError   an export (ONNX, TFLite) disagrees with the Keras model it came from
    ├── RegistryError     a registry operation cannot be done (unknown version, no earlier champion)
    │   └── NoModelError  no champion is registered yet
    ├── VersioningError   a DVC or git command failed
    ├── FetchError        an image URL was refused or could not be fetched
    └── JobError          a training job could not be started, or failed
        └── BusyError     too many trainings are pending (HTTP 429)

Library code raises these; only the boundaries (CLI, service, flows) catch them. The ones a client
can cause (ImageError, ConfigError, FetchError) are also ValueErrors. :func:`describe` is the one line a
command-line boundary prints for them, for MLflow's errors and for the operating system's.
"""

from __future__ import annotations

import os


class CellscanError(Exception):
    """Base class of every error cellscan raises on purpose."""


class ImageError(CellscanError, ValueError):
    """An input could not be used as an image."""


class DatasetError(CellscanError):
    """A dataset folder is missing or malformed."""


class ConfigError(CellscanError, ValueError):
    """A parameter, setting or argument is missing or out of range."""


class ModelError(CellscanError):
    """A saved model is missing, incomplete or incompatible."""


class ParityError(ModelError):
    """An exported model gives other verdicts (or, quantized, a worse AUROC) than the Keras model."""


class RegistryError(CellscanError):
    """A registry operation could not be done (unknown version, no champion)."""


class NoModelError(RegistryError):
    """No champion is registered yet."""


class VersioningError(CellscanError):
    """A DVC or git command failed."""


class FetchError(CellscanError, ValueError):
    """An image URL was refused or could not be fetched."""


class JobError(CellscanError):
    """A training or re-evaluation job could not be started, or it failed."""


class BusyError(JobError):
    """Too many trainings are already waiting (the service answers 429)."""


def describe(exc: BaseException) -> tuple[str, str] | None:
    """(kind, message) for an error a command should say in one line, or None for a bug (its traceback helps).

    cellscan's own errors; MLflow's (a tracking server that does not answer, a store that fails: said with
    ``MLFLOW_TRACKING_URI`` and the first line of MLflow's message, not its retries' traceback); the
    operating system's (a full disk, a path that is a file, a permission).
    """
    if isinstance(exc, CellscanError):
        return type(exc).__name__, str(exc)
    if type(exc).__module__.split(".")[0] == "mlflow":
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        uri = os.environ.get("MLFLOW_TRACKING_URI", "the local store")
        return "TrackingError", f"MLflow ({uri}) failed: {first}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return type(exc).__name__, f"{exc.strerror or exc}{where}"
    return None
