from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cellscan.errors import ImageError
from cellscan.core.images import canonical_png, decode_image, encode_png, iter_pages, load_image


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_8bit_png_scaled_to_unit_range():
    arr = np.array([[0, 128, 255]], dtype=np.uint8)
    out = decode_image(_bytes(Image.fromarray(arr), "PNG"))
    assert out.shape == (1, 3, 1)
    np.testing.assert_allclose(out[0, :, 0], [0, 128 / 255, 1], atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_keeps_its_precision(fmt):
    # Two values 1/65535 apart would collapse into one if the loader went through 8 bits.
    arr = np.array([[1000, 1001, 65535]], dtype=np.uint16)
    out = decode_image(_bytes(Image.fromarray(arr), fmt))
    assert out[0, 1, 0] - out[0, 0, 0] == pytest.approx(1 / 65535, rel=1e-3)
    assert out[0, 2, 0] == pytest.approx(1.0)


def test_rgb_jpeg_becomes_grayscale_or_rgb_as_asked():
    img = Image.new("RGB", (10, 8), (255, 0, 0))
    data = _bytes(img, "JPEG")
    gray = decode_image(data, channels=1)
    rgb = decode_image(data, channels=3)
    assert gray.shape == (8, 10, 1) and rgb.shape == (8, 10, 3)
    assert gray.mean() == pytest.approx(0.299, abs=0.03)  # luminance of pure red
    assert rgb[..., 0].mean() > 0.9 > rgb[..., 1].mean()


def test_resize_to_square():
    out = load_image(encode_png(np.zeros((20, 40), np.float32)), size=16)
    assert out.shape == (16, 16, 1) and out.dtype == np.float32


def test_32bit_integer_pixels_keep_the_16bit_scale_and_signed_ones_are_refused():
    # A dark slice and a bright one of the same scanner: the same value is the same grey level in both.
    dark = decode_image(_bytes(Image.fromarray(np.array([[100, 200]], np.int32)), "TIFF"))
    bright = decode_image(_bytes(Image.fromarray(np.array([[200, 3000]], np.int32)), "TIFF"))
    assert dark[0, 1, 0] == pytest.approx(bright[0, 0, 0]) == pytest.approx(200 / 65535)
    with pytest.raises(ImageError, match=r"from -1000 to 200 .*HU \+ 1024"):  # Hounsfield units: not clipped
        decode_image(_bytes(Image.fromarray(np.array([[-1000, 200]], np.int16)), "TIFF"))
    with pytest.raises(ImageError, match="expected unsigned 8- or 16-bit"):
        decode_image(_bytes(Image.fromarray(np.array([[0, 70000]], np.int32)), "TIFF"))


def test_float_tiff_is_min_max_scaled():
    arr = np.array([[-2.0, 0.0, 2.0]], dtype=np.float32)
    out = decode_image(_bytes(Image.fromarray(arr, mode="F"), "TIFF"))
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize("fill", [-3.4e38, 3.4e38, 1e31])
def test_float_tiff_with_fill_values_is_refused_by_name(fill):
    """No-data markers (float32's largest): their span overflows to infinity and every pixel would turn NaN,
    and even a finite one would squash the measurements to one grey level."""
    arr = np.array([[100.0, 150.0, 200.0, fill]], dtype=np.float32)
    with pytest.raises(ImageError, match=r"^ct.tif: float pixels from .* are fill values \(no-data"):
        decode_image(_bytes(Image.fromarray(arr, mode="F"), "TIFF"), name="ct.tif")
    wide = np.array([[-1e20, 0.0, 1e20]], dtype=np.float32)  # large, yet measurements: scaled as ever
    out = decode_image(_bytes(Image.fromarray(wide, mode="F"), "TIFF"))
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty file"),  # zero bytes
        (b"%PDF-1.4 not an image", "not an image"),  # another format
        (encode_png(np.random.default_rng(0).random((64, 64)).astype(np.float32))[:120], "truncated"),
    ],
)
def test_bad_bytes_raise_clear_errors(data, needle):
    with pytest.raises(ImageError, match=needle):
        decode_image(data)


def test_pixel_limit_refuses_large_images():
    data = encode_png(np.zeros((100, 100), np.float32))
    with pytest.raises(ImageError, match=r"10000 pixels; expected at most 5000"):
        decode_image(data, max_pixels=5000)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_channels_must_be_1_or_3():
    with pytest.raises(ImageError, match="channels must be 1 or 3, got 4"):
        decode_image(encode_png(np.zeros((4, 4), np.float32)), channels=4)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_float_pixels_are_refused(bad):
    arr = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    arr[2, 3] = bad
    with pytest.raises(ImageError, match="^ct.tif: image has 1 non-finite pixels"):
        decode_image(_bytes(Image.fromarray(arr, mode="F"), "TIFF"), name="ct.tif")


def test_png_text_bomb_is_an_image_error():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("k", "x" * (20 * 1024 * 1024), zip=True)
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG", pnginfo=info)
    with pytest.raises(ImageError, match="MAX_TEXT_CHUNK"):
        decode_image(buf.getvalue())


def test_canonical_png_keeps_pixels_drops_the_rest():
    from cellscan.core.images import canonical_png

    arr = (np.random.default_rng(1).random((6, 9)) * 65535).astype(np.uint16)
    png16 = _bytes(Image.fromarray(arr), "PNG")
    out, digest = canonical_png(png16 + b"PK\x03\x04trailing archive")
    assert b"PK\x03\x04" not in out and np.array_equal(np.asarray(Image.open(io.BytesIO(out))), arr)  # 16 bits kept
    assert canonical_png(_bytes(Image.fromarray(arr), "TIFF"))[1] == digest  # same pixels, other container
    assert canonical_png(_bytes(Image.fromarray(arr + 1), "PNG"))[1] != digest


def _stack(pages: list[np.ndarray], fmt: str = "TIFF") -> bytes:
    imgs = [Image.fromarray(p) for p in pages]
    buf = io.BytesIO()
    imgs[0].save(buf, format=fmt, save_all=True, append_images=imgs[1:])
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_a_stack_is_refused_where_one_image_is_expected(fmt):
    """A multi-page TIFF (CT slices) or an animated PNG scored on its first page misses defects on the others."""
    data = _stack([np.full((8, 8), v, np.uint8) for v in (10, 20, 30)], fmt)
    with pytest.raises(ImageError, match=r"scan: a stack of 3 pages .*expected one image per file"):
        decode_image(data, name="scan")
    with pytest.raises(ImageError, match="a stack of 3 pages"):
        canonical_png(data)


def test_iter_pages_yields_each_slice_losslessly_and_a_single_image_as_it_is():
    rng = np.random.default_rng(1)
    slices = [rng.integers(0, 65536, (6, 9), dtype=np.uint16) for _ in range(3)]
    pages = list(iter_pages(_stack(slices), name="ct.tif"))
    assert [label for label, _ in pages] == ["ct.tif#page=1", "ct.tif#page=2", "ct.tif#page=3"]
    for (_, data), want in zip(pages, slices, strict=True):
        assert np.array_equal(decode_image(data)[..., 0], want.astype(np.float32) / 65535)  # 16 bits kept
    one = encode_png(np.zeros((4, 4), np.float32))
    assert list(iter_pages(one, name="a.png")) == [("a.png", one)]


def test_a_stack_on_disk_is_read_a_page_at_a_time(tmp_path):
    """Batch scoring of a CT volume of gigabytes must not hold the file in memory: the pages come from the
    file as they are read (the bytes Python holds stay far below the file's size), the same as from its
    bytes."""
    import tracemalloc

    from cellscan.core.images import iter_file_pages

    slices = [np.full((256, 256), 1000 * k, np.uint16) for k in range(1, 49)]
    path = tmp_path / "vol.tif"
    path.write_bytes(_stack(slices))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        seen = 0
        for k, (label, page) in enumerate(iter_file_pages([path])):
            assert label == f"{path}#page={k + 1}"
            assert float(decode_image(page).max()) == pytest.approx(1000 * (k + 1) / 65535)
            seen += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == 48
    assert peak < size / 4, (peak, size)
    from_bytes = iter_pages(path.read_bytes(), name="v")
    assert [label for label, _ in iter_pages(path, name="v")] == [label for label, _ in from_bytes]
    one = tmp_path / "one.png"
    one.write_bytes(encode_png(np.zeros((4, 4), np.float32)))
    assert list(iter_pages(one, name="one")) == [("one", one.read_bytes())]


def test_iter_pages_refuses_too_many_pages_and_reports_an_oversized_page():
    data = _stack([np.zeros((4, 4), np.uint8), np.zeros((40, 40), np.uint8), np.zeros((4, 4), np.uint8)])
    with pytest.raises(ImageError, match="a stack of more than 2 pages; expected at most 2"):
        list(iter_pages(data, max_pages=2))
    pages = list(iter_pages(data, name="s.tif", max_pixels=100))
    assert isinstance(pages[1][1], ImageError)
    assert "s.tif#page=2: page has 40x40=1600 pixels" in str(pages[1][1])
    assert [type(data) for _, data in pages[::2]] == [bytes, bytes]  # the pages around it still come


def test_a_truncated_stack_is_an_image_error():
    """A stack cut short: its first page fails to load, or it is still a stack of the pages that remain."""
    for cut, needle in ((1000, "vol.tif: truncated or corrupt TIFF data"), (5000, "vol.tif: a stack of 2 pages")):
        data = _stack([np.full((48, 48), v, np.uint16) for v in (1, 2, 3)])[:cut]
        with pytest.raises(ImageError, match=needle):
            decode_image(data, name="vol.tif")


def test_a_tiff_whose_next_page_link_is_broken_is_one_image():
    """Pillow reads such a file's image, and cellscan scored it before it counted pages: it still does."""
    import struct

    data = bytearray(_stack([np.full((6, 5), 300, np.uint16)]))
    ifd = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, ifd)[0]
    for link in (len(data) + 999, 0xFFFFFF00, 3):  # past the end, garbage, inside the header
        struct.pack_into("<I", data, ifd + 2 + 12 * count, link)
        assert float(decode_image(bytes(data)).max()) == pytest.approx(300 / 65535)
        assert [label for label, _ in iter_pages(bytes(data), name="a.tif")] == ["a.tif"]


def test_a_long_chain_of_pages_is_refused_after_reading_a_few():
    """Thousands of tiny pages (a crafted upload) are refused once the first 64 headers show a stack: the
    message says so instead of a count, which would have meant reading them all."""
    data = _stack([np.zeros((2, 2), np.uint8)] * 300)
    with pytest.raises(ImageError, match="a stack of more than 64 pages"):
        decode_image(data)


def test_a_tiff_preview_page_is_not_a_slice(tmp_path):
    """Scanners may store a reduced-resolution preview (NewSubfileType 1) beside the image: still one image."""
    from PIL import TiffImagePlugin

    def tiff(pages: list[tuple[np.ndarray, int]]) -> bytes:
        path = tmp_path / "t.tif"
        with TiffImagePlugin.AppendingTiffWriter(str(path), True) as tf:
            for arr, subfile in pages:
                Image.fromarray(arr).save(tf, format="TIFF", tiffinfo={254: subfile})
                tf.newFrame()
        return path.read_bytes()

    image, preview = np.full((32, 40), 700, np.uint16), np.full((4, 5), 9, np.uint16)
    for pages in ([(image, 0), (preview, 1)], [(preview, 1), (image, 0)]):
        data = tiff(pages)
        assert decode_image(data).shape == (32, 40, 1)
        assert float(decode_image(data).max()) == pytest.approx(700 / 65535)
        assert [label for label, _ in iter_pages(data, name="a.tif")] == ["a.tif"]
    data = tiff([(image, 0), (preview, 1), (image + 1, 0)])
    with pytest.raises(ImageError, match="a stack of 2 pages"):
        decode_image(data)
    assert [label for label, _ in iter_pages(data, name="v.tif")] == ["v.tif#page=1", "v.tif#page=3"]


def test_a_broken_image_or_mask_read_for_its_size_or_as_a_mask_is_named(tmp_path):
    from cellscan.core.images import image_shape, load_mask

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut_mask.png").write_bytes(encode_png(np.random.default_rng(0).random((64, 64)).astype(np.float32))[:200])
    with pytest.raises(ImageError, match="empty.png: not an image"):
        image_shape(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="empty.png: the ground-truth mask is not an image"):
        load_mask(tmp_path / "empty.png", 8)
    with pytest.raises(ImageError, match="cut_mask.png: truncated or corrupt ground-truth mask"):
        load_mask(tmp_path / "cut_mask.png", 8)


def test_masks_are_read_whatever_their_encoding(tmp_path):
    from cellscan.core.images import load_mask

    defect = np.zeros((16, 16), np.uint8)
    defect[4:8, 4:8] = 1
    Image.fromarray(defect * 255).save(tmp_path / "mvtec.png")  # 0 / 255
    Image.fromarray(defect).save(tmp_path / "labels.png")  # 0 / 1 label image
    red = Image.fromarray(np.stack([defect * 255, defect * 0, defect * 0], -1)).convert("P")  # a red defect
    red.save(tmp_path / "palette.png")
    Image.fromarray(defect * 255).save(tmp_path / "noisy.jpg", quality=60)  # JPEG noise around the edges
    for name in ("mvtec.png", "labels.png", "palette.png"):
        assert load_mask(tmp_path / name, 16).sum() == 16, name
    assert abs(int(load_mask(tmp_path / "noisy.jpg", 16).sum()) - 16) <= 2  # noise is not a defect


def test_pages_of_a_jpeg_compressed_stack_keep_their_pixels():
    """Each page is passed on uncompressed: re-encoding a JPEG page as JPEG would change its grey levels."""
    rng = np.random.default_rng(3)
    imgs = [Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)) for _ in range(2)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="TIFF", save_all=True, append_images=imgs[1:], compression="jpeg")
    stack = Image.open(io.BytesIO(buf.getvalue()))
    for k, (_, page) in enumerate(iter_pages(buf.getvalue())):
        stack.seek(k)
        assert np.array_equal(decode_image(page)[..., 0], np.asarray(stack, np.float32) / 255)
