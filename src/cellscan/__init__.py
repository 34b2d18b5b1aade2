"""cellscan: visual anomaly detection for CT/X-ray scans of battery cells."""

from __future__ import annotations

__version__ = "0.1.0"
