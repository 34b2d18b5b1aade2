"""Load images from files or bytes into float arrays, with checks at the edge.

Every image becomes ``float32`` of shape ``(H, W, C)`` in ``[0, 1]``, with ``C`` 1 (grayscale, the
native case for CT) or 3 (RGB). 16-bit grayscale PNG/TIFF keep their full range: they are divided
by 65535, not truncated to 8 bits first.

Example:
    >>> import numpy as np
    >>> from cellscan.core.images import encode_png, load_image
    >>> arr = load_image(encode_png(np.full((4, 6), 0.5, np.float32)), size=8)
    >>> arr.shape, round(float(arr.mean()), 2)
    ((8, 8, 1), 0.5)
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from cellscan.errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SUPPORTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F", "CMYK")
DEFAULT_MAX_PIXELS = 50_000_000
FILL_VALUE = 1e30  # float pixels beyond it (+-3.4e38 is float32's largest) mark missing data
# What Pillow raises on a damaged file: a truncated TIFF's missing tag is a TypeError (from a KeyError).
_DECODE_ERRORS = (ValueError, OSError, SyntaxError, struct.error, EOFError, TypeError, KeyError, IndexError)
MAX_PAGES = 4096  # pages of one stack (multi-page TIFF) that batch scoring reads
SINGLE_SCAN = 64  # page headers read to tell one image (perhaps with previews) from a stack


def _open(data: bytes | BinaryIO, name: str, max_pixels: int, *,
          stack: bool = False) -> Image.Image:
    """Open and check one image (its bytes, or an open file read as needed), its pixels loaded; ``stack``
    lets a file of several pages through with its header checked only (the caller loads each page it
    reads)."""
    size = len(data) if isinstance(data, bytes) else os.fstat(data.fileno()).st_size
    if size == 0:
        msg = f"{name}: empty file (0 bytes); expected a PNG, JPEG or TIFF image"
        raise ImageError(msg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        msg = f"{name}: image too large; expected at most {max_pixels} pixels"
        raise ImageError(msg) from None
    except UnidentifiedImageError:
        msg = f"{name}: not an image; expected one of {', '.join(SUPPORTED_FORMATS)}"
        raise ImageError(msg) from None
    except _DECODE_ERRORS as exc:  # e.g. a huge PNG text chunk
        msg = f"{name}: corrupt or unsafe image header ({str(exc)[:120]})"
        raise ImageError(msg) from None
    if img.format not in SUPPORTED_FORMATS:
        msg = f"{name}: unsupported format {img.format}; expected one of {', '.join(SUPPORTED_FORMATS)}"
        raise ImageError(msg)
    if not stack:  # reads at most SINGLE_SCAN page headers (a crafted chain of thousands costs no more)
        pages, cut = _pages(img, SINGLE_SCAN)
        if len(pages) > 1:
            msg = (f"{name}: a stack of {f'more than {SINGLE_SCAN}' if cut else len(pages)} pages (a multi-page "
                   f"{img.format}, e.g. CT slices); expected one image per file: batch scoring (python -m "
                   "flows.score_folder, cellscan-edge score) scores every page of a stack")
            raise ImageError(msg)
        if pages[0]:  # the image is not the file's first page (that one is a preview)
            img.seek(pages[0])
    w, h = img.size
    if w * h > max_pixels:
        msg = f"{name}: image has {w}x{h}={w * h} pixels; expected at most {max_pixels}"
        raise ImageError(msg)
    if w < 1 or h < 1:
        msg = f"{name}: image has no pixels ({w}x{h})"
        raise ImageError(msg)
    if img.mode not in SUPPORTED_MODES:
        msg = f"{name}: unsupported image mode {img.mode}; expected one of {', '.join(SUPPORTED_MODES)}"
        raise ImageError(msg)
    if stack:
        return img
    try:
        img.load()
    except _DECODE_ERRORS as exc:
        msg = f"{name}: truncated or corrupt {img.format} data ({exc})"
        raise ImageError(msg) from None
    return img


def _pages(img: Image.Image, limit: int) -> tuple[list[int], bool]:
    """The indices of the file's images among its first ``limit`` pages, and whether pages were left
    unread. A TIFF's reduced-resolution pages (previews, thumbnails: NewSubfileType bit 0) are not images
    where it has a full-resolution one. A page chain that breaks after the first page ends the file there:
    Pillow reads such a file's first image, and so does cellscan."""
    if img.format == "PNG":  # an animated PNG gives its frame count in one chunk
        n = int(getattr(img, "n_frames", 1) or 1)
        return list(range(min(n, limit))), n > limit
    if img.format != "TIFF":
        return [0], False
    full: list[int] = []
    k, cut = 0, False
    try:
        while True:
            if not int(img.tag_v2.get(254, 0)) & 1:
                full.append(k)
            if k + 1 >= limit:
                cut = True
                break
            img.seek(k + 1)
            k += 1
    except _DECODE_ERRORS:  # the end of the chain (EOFError), or a broken link after the first page
        pass
    try:
        img.seek(0)
    except _DECODE_ERRORS:
        pass
    return full or list(range(k + 1)), cut


def iter_pages(source: bytes | Path, *, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
               max_pages: int = MAX_PAGES) -> Iterator[tuple[str, bytes | ImageError]]:
    """Each page of a multi-page TIFF or PNG (a CT stack) as ``(label, single-page bytes or its error)``.

    ``source`` is the file's bytes or its path. A file of one image yields ``(name, its bytes)`` as they
    are (a TIFF's reduced-resolution previews are not images); a stack yields ``name#page=K`` (K from 1,
    the page's place in the file) with the page re-encoded losslessly in its own format and mode (16-bit
    stays 16-bit; a TIFF page uncompressed), one at a time. A stack given by its path is not read whole:
    each page is read from the file as it comes, so a scan of several gigabytes costs one page of memory.
    A page that cannot be read yields its error and the next pages still come.

    Raises:
        ImageError: the file itself is not a readable image, or holds more than ``max_pages`` pages.
        OSError: the path cannot be read.

    Example:
        >>> import io, numpy as np
        >>> from PIL import Image
        >>> buf = io.BytesIO()
        >>> slices = [Image.fromarray(np.full((4, 4), v, np.uint16)) for v in (1000, 2000)]
        >>> slices[0].save(buf, format="TIFF", save_all=True, append_images=slices[1:])
        >>> pages = iter_pages(buf.getvalue(), name="ct.tif")
        >>> [(label, float(decode_image(page).max())) for label, page in pages]
        [('ct.tif#page=1', 0.015259...), ('ct.tif#page=2', 0.030518...)]
    """
    if isinstance(source, bytes):
        yield from _split_pages(source, lambda: source, name, max_pixels, max_pages)
        return
    with source.open("rb") as fh:
        yield from _split_pages(fh, source.read_bytes, name, max_pixels, max_pages)


def _split_pages(data: bytes | BinaryIO, whole: Callable[[], bytes], name: str, max_pixels: int,
                 max_pages: int) -> Iterator[tuple[str, bytes | ImageError]]:
    """:func:`iter_pages` on the file's bytes or its open file (``whole``: the file's bytes, asked for only
    where it holds one image)."""
    img = _open(data, name, max_pixels, stack=True)
    pages, cut = _pages(img, max_pages + 1)
    if len(pages) == 1 and not cut:
        yield name, whole()
        return
    if cut or len(pages) > max_pages:
        msg = f"{name}: a stack of more than {max_pages} pages; expected at most {max_pages}"
        raise ImageError(msg)
    for k in pages:
        label = f"{name}#page={k + 1}"
        try:
            img.seek(k)
            w, h = img.size
            if w * h > max_pixels:
                msg = f"{label}: page has {w}x{h}={w * h} pixels; expected at most {max_pixels}"
                yield label, ImageError(msg)
                continue
            img.load()
            buf = io.BytesIO()
            if img.format == "TIFF":  # uncompressed: a JPEG-compressed page would lose grey levels again
                img.save(buf, format="TIFF", compression="raw")
            else:
                img.save(buf, format=img.format)
            yield label, buf.getvalue()
        except _DECODE_ERRORS as exc:
            yield label, ImageError(f"{label}: unreadable page ({str(exc)[:120]})")


def iter_file_pages(paths: list[Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[str, bytes | Exception]]:
    """:func:`iter_pages` over files, read one at a time: ``(label, bytes or the error)`` for each image and
    each page of a stack; a file that cannot be read or is not an image yields its error under its path."""
    for path in paths:
        try:
            yield from iter_pages(path, name=str(path), max_pixels=max_pixels)
        except (ImageError, OSError) as exc:
            yield str(path), exc


def _to_float(img: Image.Image, channels: int) -> np.ndarray:
    """Convert a decoded image to float32 (H, W, C) in [0, 1]."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit, or 32-bit integers (signed 16-bit TIFFs read so)
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        if lo < 0 or hi > 65535:  # never clipped, never scaled by what one image holds
            msg = (f"integer pixels from {lo:g} to {hi:g} (signed or 32-bit data); expected unsigned 8- or "
                   "16-bit values: add an offset (CT numbers: HU + 1024) and save as 16-bit, or as float")
            raise ImageError(msg)
        out = (arr / np.float32(65535.0))[..., None]
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            msg = f"image has {int((~np.isfinite(arr)).sum())} non-finite pixels (inf or nan); expected finite values"
            raise ImageError(msg)
        lo, hi = float(arr.min()), float(arr.max())
        if max(-lo, hi) > FILL_VALUE:  # no measurement is that large: min-max would flatten the real data
            msg = (f"float pixels from {lo:g} to {hi:g}: values beyond {FILL_VALUE:g} are fill values "
                   "(no-data markers), not measurements; expected them replaced by the background level")
            raise ImageError(msg)
        if lo >= 0.0 and hi <= 1.0:
            gray = arr
        else:  # arbitrary float range (e.g. attenuation values): min-max scale
            gray = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        out = gray[..., None]
    elif mode in ("1", "L"):
        out = np.asarray(img.convert("L"), dtype=np.float32)[..., None] / np.float32(255.0)
    else:
        out = np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    if channels == 1 and out.shape[-1] == 3:
        out = (out @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    elif channels == 3 and out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out.astype(np.float32)


def resize(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a float (H, W, C) array to ``size`` (square int or (H, W)) with bilinear filtering."""
    h, w = (size, size) if isinstance(size, int) else size
    if arr.shape[:2] == (h, w):
        return arr.astype(np.float32, copy=False)
    chans = [
        np.asarray(Image.fromarray(arr[..., c].astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
        for c in range(arr.shape[-1])
    ]
    return np.stack(chans, axis=-1).astype(np.float32)


def decode_image(
    data: bytes,
    *,
    size: int | tuple[int, int] | None = None,
    channels: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str = "image",
) -> np.ndarray:
    """Decode encoded image bytes into float32 (H, W, C) in [0, 1].

    Args:
        data: PNG, JPEG, TIFF or BMP bytes; 8- or 16-bit grayscale, RGB(A) or palette.
        size: resize to ``size x size`` (an int) or to ``(height, width)`` when given.
        channels: 1 (grayscale) or 3 (RGB); colour inputs are converted by luminance.
        max_pixels: refuse images with more pixels than this (decompression bombs).
        name: how the input is named in error messages.

    Raises:
        ImageError: empty, not an image, truncated, too large or of an unsupported mode.
    """
    if channels not in (1, 3):
        msg = f"channels must be 1 or 3, got {channels}"
        raise ImageError(msg)
    img = _open(data, name, max_pixels)
    try:
        arr = _to_float(img, channels)
    except ImageError as exc:  # non-finite float pixels: named like every other refusal
        msg = f"{name}: {exc}"
        raise ImageError(msg) from None
    return resize(arr, size) if size else arr


def load_image(
    source: str | Path | bytes,
    *,
    size: int | tuple[int, int] | None = None,
    channels: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Load an image from a path or from bytes; see :func:`decode_image`.

    Raises:
        ImageError: the path does not exist, or the content is not a usable image.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return decode_image(bytes(source), size=size, channels=channels, max_pixels=max_pixels)
    path = Path(source)
    if not path.is_file():
        msg = f"path does not exist or is not a file: {path}"
        raise ImageError(msg)
    return decode_image(path.read_bytes(), size=size, channels=channels, max_pixels=max_pixels, name=str(path))


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@contextmanager
def _named_errors(path: Path, not_image: str, corrupt: str) -> Iterator[None]:
    """Pillow's errors reading ``path`` as ImageErrors naming it: ``not_image``, or ``corrupt (reason)``."""
    try:
        yield
    except UnidentifiedImageError:
        msg = f"{path}: {not_image}"
        raise ImageError(msg) from None
    except _DECODE_ERRORS as exc:
        msg = f"{path}: {corrupt} ({str(exc)[:120]})"
        raise ImageError(msg) from None


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only.

    Raises:
        ImageError: the file is not an image (or its header is broken), naming it.
    """
    not_image = f"not an image; expected one of {', '.join(SUPPORTED_FORMATS)}"
    with _named_errors(path, not_image, "corrupt image header"), Image.open(path) as img:
        return img.size[1], img.size[0]


def load_mask(path: Path | None, size: int | tuple[int, int]) -> np.ndarray:
    """Load a binary ground-truth mask resized to ``size`` (nearest); all zeros when ``path`` is None."""
    h, w = _hw(size)
    if path is None or not path.is_file():
        return np.zeros((h, w), dtype=bool)
    with _named_errors(path, "the ground-truth mask is not an image; expected a PNG of 0 and 255",
                       "truncated or corrupt ground-truth mask"), Image.open(path) as img:
        exact = img.mode in ("1", "P")  # palette masks (a red defect) and bilevel ones have no grey noise
        small = np.asarray(img.convert("L").resize((w, h), Image.NEAREST))
    # 0/255 as MVTec's (a JPEG's noise stays under half); 0/1 label images and palette masks: any non-zero
    return small > (0 if exact or small.max(initial=0) <= 1 else 127)


def load_batch(paths: list[Path], *, size: int | tuple[int, int], channels: int,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load many images into one (N, H, W, C) float32 array, each resized to ``size``."""
    h, w = _hw(size)
    out = np.empty((len(paths), h, w, channels), dtype=np.float32)
    for i, p in enumerate(paths):
        out[i] = load_image(p, size=size, channels=channels, max_pixels=max_pixels)
    return out


def to_uint(arr: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Quantise a [0, 1] float array to uint8 or uint16."""
    top = 255 if bit_depth == 8 else 65535
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(np.clip(arr, 0.0, 1.0) * top).astype(dtype)


def encode_png(arr: np.ndarray, bit_depth: int = 8) -> bytes:
    """Encode a [0, 1] float (H, W) or (H, W, C) array as PNG bytes (16-bit only for grayscale)."""
    a = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    if bit_depth == 16 and a.ndim == 2:
        img = Image.fromarray(to_uint(a, 16))
    else:
        img = Image.fromarray(to_uint(a, 8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_png(arr: np.ndarray, path: Path, bit_depth: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(arr, bit_depth))


def canonical_png(data: bytes, *, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """Re-encode an image from its decoded pixels, and a digest of those pixels.

    What gets stored is this PNG, never the bytes sent: anything appended to or hidden in the
    container (a ZIP behind a PNG, metadata chunks) is dropped. Grayscale stays 8-bit, 16-bit and
    float grayscale become 16-bit, everything else RGB. The digest (SHA-256 of shape and pixels) is the
    same for two encodings of the same pixels, so duplicates are found whatever the file format.

    Raises:
        ImageError: as :func:`decode_image`.
    """
    import hashlib

    img = _open(data, name, max_pixels)
    if img.mode.startswith("I") or img.mode == "F":
        try:
            pixels = to_uint(_to_float(img, 1)[..., 0], 16)
        except ImageError as exc:
            msg = f"{name}: {exc}"
            raise ImageError(msg) from None
    elif img.mode in ("1", "L", "LA"):
        pixels = np.asarray(img.convert("L"))
    else:
        pixels = np.asarray(img.convert("RGB"))
    digest = hashlib.sha256(repr((pixels.shape, str(pixels.dtype))).encode() + pixels.tobytes()).hexdigest()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), digest
