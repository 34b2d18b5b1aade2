"""What may enter the dataset: each image once, wherever it is.

:class:`DatasetIndex` keeps the pixel digest (:func:`cellscan.core.images.canonical_png`) of every
image under the data root, recomputed only for files whose size or modification time changed, so
``/retrain`` and ``/anomaly`` can refuse an image that already exists anywhere in the dataset (a copy
of a validation image filed for training would leak validation into training).
"""

from __future__ import annotations

import threading
from pathlib import Path

from cellscan.core.data import hidden
from cellscan.core.images import IMAGE_SUFFIXES, canonical_png
from cellscan.errors import ImageError


def shown(path: Path, home: Path) -> str:
    """A dataset file as answers name it: relative to the project where it lies inside it, else whole
    (``data.root`` may be an absolute folder elsewhere).

    Example:
        >>> home = Path("/srv/cellscan")
        >>> shown(home / "data/temp/a.png", home), shown(Path("/mnt/cells/a.png"), home)
        ('data/temp/a.png', '/mnt/cells/a.png')
    """
    return str(path.relative_to(home)) if path.is_relative_to(home) else str(path)


class DatasetIndex:
    """Pixel digests of the images under one data root, cached by (size, mtime)."""

    def __init__(self, root: Path, max_pixels: int) -> None:
        self.root = root
        self.max_pixels = max_pixels
        self._cache: dict[Path, tuple[int, int, str | None]] = {}
        self._lock = threading.Lock()

    def _digest(self, path: Path) -> str | None:
        st = path.stat()
        hit = self._cache.get(path)
        if hit and hit[:2] == (st.st_size, st.st_mtime_ns):
            return hit[2]
        try:
            digest: str | None = canonical_png(path.read_bytes(), name=str(path), max_pixels=self.max_pixels)[1]
        except (ImageError, OSError):
            digest = None
        self._cache[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def find(self, digest: str) -> Path | None:
        """The first stored image with these pixels, or None."""
        with self._lock:
            paths = [p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                     and not any(hidden(n) for n in p.relative_to(self.root).parts)
                     and "ground_truth" not in p.parts]
            for gone in set(self._cache) - set(paths):
                del self._cache[gone]
            for p in sorted(paths):
                try:
                    if self._digest(p) == digest:
                        return p
                except OSError:
                    continue
        return None
