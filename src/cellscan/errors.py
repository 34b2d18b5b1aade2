"""Errors raised by cellscan.

Hierarchy::

    CellscanError
    ├── ImageError        an input is not a usable image (format, size, mode, truncation)
    ├── DatasetError      a dataset folder is missing or does not follow a known layout
    ├── ConfigError       params.yaml or an argument is out of range
    └── ModelError        a model directory is missing, incomplete or incompatible

Library code raises these; only the boundaries (CLI, service, flows) catch them.
"""

from __future__ import annotations


class CellscanError(Exception):
    """Base class of every error cellscan raises on purpose."""


class ImageError(CellscanError, ValueError):
    """An input could not be used as an image."""


class DatasetError(CellscanError):
    """A dataset folder is missing or malformed."""


class ConfigError(CellscanError, ValueError):
    """A parameter is missing or out of range."""


class ModelError(CellscanError):
    """A saved model is missing, incomplete or incompatible."""
