"""decode_image and model preprocessing against known answers: PIL's own decoder, hand-computed pixels, naive loops.

Every image is generated here with PIL/numpy; nothing is read from outside the test.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from conftest import jpeg_bytes, png_bytes
from PIL import Image, ImageFile, ImageOps

from retrieval_core.preprocess import DecodeError, DecodeLimits, Preprocessing, decode_image, to_model_input

ERROR_TYPES = {"empty", "too_large", "not_an_image", "decompression_bomb", "too_small", "truncated", "corrupt"}
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(seed: int, w: int = 48, h: int = 40, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A real 16x16 PNG whose IHDR claims ``width`` x ``height`` (chunk CRC recomputed, so the header is valid)."""
    png = png_bytes(Image.new("RGB", (16, 16), (1, 2, 3)))
    assert png[12:16] == b"IHDR"
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]  # bit depth, colour type, etc. unchanged
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def _split_jpeg(orientation: int) -> bytes:
    """40x20 JPEG, left half red and right half blue, with the given EXIF orientation."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20], arr[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(arr), "JPEG", exif=exif, quality=95)


def _close(pixels: np.ndarray, colour, tol: int = 12) -> bool:
    return bool(np.all(np.abs(pixels.astype(int) - np.asarray(colour)) <= tol))


# ---------------------------------------------------------------- good images


def test_png_without_prep_equals_pil_decode_exactly():
    """Oracle: the source array and PIL's own decode of the PNG (lossless, so exact)."""
    arr = _noise(1)
    data = png_bytes(Image.fromarray(arr))
    dec = decode_image(data)
    assert dec.pixels.dtype == np.uint8 and dec.pixels.shape == (40, 48, 3)
    np.testing.assert_array_equal(dec.pixels, arr)
    np.testing.assert_array_equal(dec.pixels, _pil_rgb(data))
    assert (dec.width, dec.height, dec.format, dec.mode) == (48, 40, "PNG", "RGB")


def test_jpeg_without_prep_equals_pil_decode():
    """Oracle: PIL's decode of the same JPEG bytes (same libjpeg, so equal up to 1 level)."""
    data = jpeg_bytes(2)
    dec = decode_image(data)
    assert dec.pixels.shape == (40, 48, 3) and dec.pixels.dtype == np.uint8
    assert np.abs(dec.pixels.astype(int) - _pil_rgb(data)).max() <= 1
    assert (dec.width, dec.height, dec.format, dec.mode) == (48, 40, "JPEG", "RGB")


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_with_prep_shape_is_square_uint8(fmt, resize, size):
    """Oracle: the contract (S, S, 3) uint8; width/height still report the original size."""
    data = jpeg_bytes(3, size=(200, 120)) if fmt == "JPEG" else png_bytes(Image.fromarray(_noise(3, 200, 120)))
    dec = decode_image(data, Preprocessing(image_size=size, resize=resize))
    assert dec.pixels.shape == (size, size, 3) and dec.pixels.dtype == np.uint8
    assert (dec.width, dec.height) == (200, 120)


def test_letterbox_pads_with_pad_value_above_and_below():
    """Oracle: hand-computed layout. 40x20 -> scale 0.8 -> 32x16 red band in rows 8..23, white elsewhere."""
    data = png_bytes(Image.new("RGB", (40, 20), RED))
    px = decode_image(data, Preprocessing(image_size=32)).pixels
    assert px.shape == (32, 32, 3)
    assert _close(px[8:24], RED, 0)
    assert _close(px[:8], WHITE, 0) and _close(px[24:], WHITE, 0)


def test_letterbox_uses_custom_pad_value():
    """Oracle: padding rows equal pad_value on every channel."""
    data = png_bytes(Image.new("RGB", (20, 40), RED))  # tall: padding left and right
    px = decode_image(data, Preprocessing(image_size=32, pad_value=7)).pixels
    assert _close(px[:, 8:24], RED, 0)
    assert _close(px[:, :8], (7, 7, 7), 0) and _close(px[:, 24:], (7, 7, 7), 0)


def test_stretch_fills_the_whole_square():
    """Oracle: stretching a solid colour gives that colour everywhere, no padding."""
    data = png_bytes(Image.new("RGB", (40, 20), RED))
    px = decode_image(data, Preprocessing(image_size=32, resize="stretch")).pixels
    assert px.shape == (32, 32, 3) and _close(px, RED, 0)


# ---------------------------------------------------------------- modes


def test_cmyk_jpeg_matches_pil_conversion():
    """Oracle: PIL's own CMYK -> RGB conversion of the same file."""
    data = jpeg_bytes(4, mode="CMYK")
    dec = decode_image(data)
    assert dec.mode == "CMYK" and dec.pixels.shape == (40, 48, 3)
    assert np.abs(dec.pixels.astype(int) - _pil_rgb(data)).max() <= 2
    assert decode_image(data, Preprocessing(image_size=16)).pixels.shape == (16, 16, 3)


def test_rgba_is_composited_on_white():
    """Oracle: alpha blending over white, c*a + 255*(1-a), computed by hand."""
    arr = np.zeros((20, 30, 4), np.uint8)
    arr[:, :10] = (10, 200, 30, 255)  # opaque: keeps its colour
    arr[:, 10:20] = (0, 0, 0, 0)  # fully transparent black: must become white, not black
    arr[:, 20:] = (0, 0, 200, 128)  # half transparent
    dec = decode_image(png_bytes(Image.fromarray(arr, "RGBA")))
    assert dec.mode == "RGBA"
    assert _close(dec.pixels[:, :10], (10, 200, 30), 0)
    assert _close(dec.pixels[:, 10:20], WHITE, 0)
    a = 128 / 255
    assert _close(dec.pixels[:, 20:], (255 * (1 - a), 255 * (1 - a), 200 * a + 255 * (1 - a)), 1)


def test_palette_with_transparency_index_is_white_where_transparent():
    """Oracle: the palette colour where opaque; white (the compositing background) where transparent."""
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 128, 0] + [0] * (253 * 3))
    img.paste(1, (0, 0, 8, 16))
    img.paste(2, (8, 0, 16, 8))  # index 0 (black, but transparent) stays in the lower right quarter
    data = _save(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    px = decode_image(data).pixels
    assert _close(px[:, :8], RED, 0)
    assert _close(px[:8, 8:], (0, 128, 0), 0)
    assert _close(px[8:, 8:], WHITE, 0)


def test_greyscale_becomes_three_equal_channels():
    """Oracle: the source grey values, repeated on R, G and B."""
    grey = np.tile(np.arange(0, 240, 5, dtype=np.uint8), (12, 1))
    dec = decode_image(png_bytes(Image.fromarray(grey, "L")))
    assert dec.mode == "L" and dec.pixels.shape == (*grey.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(dec.pixels[..., c], grey)


def test_16bit_greyscale_is_scaled_to_8bit():
    """Oracle: 16-bit value / 257 (the exact 16 -> 8 bit map), within 1 level; the full range 0..65535."""
    values = np.linspace(0, 65535, 16 * 64).round().astype(np.uint16).reshape(16, 64)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    dec = decode_image(png_bytes(img))
    assert dec.mode.startswith("I")
    expected = values / 257.0
    for c in range(3):
        assert np.abs(dec.pixels[..., c] - expected).max() <= 1
    assert dec.pixels.min() == 0 and dec.pixels.max() == 255


def test_animated_gif_gives_first_frame():
    """Oracle: the first frame's colour (red), not the second's (blue)."""
    frames = [Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    dec = decode_image(data)
    assert dec.format == "GIF" and _close(dec.pixels, RED, 0)


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_exif_transpose(orientation):
    """Oracle: ImageOps.exif_transpose of PIL's decode; width/height are the displayed size."""
    data = _split_jpeg(orientation)
    dec = decode_image(data)
    oracle = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert dec.pixels.shape == oracle.shape
    assert np.abs(dec.pixels.astype(int) - oracle).max() <= 2
    assert (dec.width, dec.height) == (oracle.shape[1], oracle.shape[0])


@pytest.mark.parametrize(
    "orientation, size, red_region, blue_region",
    [
        # 6: rotate 90 degrees clockwise for display, so the left (red) half ends up on top.
        (6, (20, 40), np.s_[2:18, :], np.s_[22:38, :]),
        # 8: rotate 90 degrees counter-clockwise, so the left half ends up at the bottom.
        (8, (20, 40), np.s_[22:38, :], np.s_[2:18, :]),
        # 3: rotate 180 degrees, so left and right swap.
        (3, (40, 20), np.s_[:, 22:38], np.s_[:, 2:18]),
    ],
)
def test_exif_orientation_puts_colours_where_a_viewer_shows_them(orientation, size, red_region, blue_region):
    """Oracle: hand-worked display layout of a left-red / right-blue image for each orientation."""
    dec = decode_image(_split_jpeg(orientation))
    assert (dec.width, dec.height) == size
    assert dec.pixels.shape == (size[1], size[0], 3)
    assert _close(dec.pixels[red_region], RED, 30)
    assert _close(dec.pixels[blue_region], BLUE, 30)


def test_exif_orientation_is_applied_before_resizing():
    """Oracle: orientation 6 letterboxed to 16: a 8x16 column with red on top, blue below, white at the sides."""
    dec = decode_image(_split_jpeg(6), Preprocessing(image_size=16))
    px = dec.pixels
    assert px.shape == (16, 16, 3) and (dec.width, dec.height) == (20, 40)
    assert _close(px[1:7, 5:11], RED, 40) and _close(px[9:15, 5:11], BLUE, 40)
    assert _close(px[:, :3], WHITE, 0) and _close(px[:, 13:], WHITE, 0)


# ---------------------------------------------------------------- to_model_input


def test_to_model_input_matches_naive_loop():
    """Oracle: ((v / 255) - mean[c]) / std[c], written out as a per-pixel loop into CHW layout."""
    prep = Preprocessing(image_size=8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    pixels = np.random.default_rng(5).integers(0, 256, (2, 2, 2, 3), dtype=np.uint8)  # N=2, 2x2
    expected = np.zeros((2, 3, 2, 2))
    for n in range(2):
        for y in range(2):
            for x in range(2):
                for c in range(3):
                    expected[n, c, y, x] = (pixels[n, y, x, c] / 255 - prep.mean[c]) / prep.std[c]
    out = to_model_input(pixels, prep)
    assert out.dtype == np.float32 and out.shape == (2, 3, 2, 2) and out.flags.c_contiguous
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    single = to_model_input(pixels[1], prep)  # one (H, W, 3) image gets a batch axis
    assert single.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(single[0], expected[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- broken inputs


def _good_jpeg() -> bytes:
    return jpeg_bytes(6, size=(64, 48))


def _good_png() -> bytes:
    return png_bytes(Image.fromarray(_noise(6, 48, 40)))


TRUNC = {"truncated", "corrupt"}
BROKEN = {
    # name: (bytes, allowed error types, limits)
    "jpeg_cut_half": (lambda: _good_jpeg()[: len(_good_jpeg()) // 2], TRUNC, None),
    "jpeg_cut_quarter": (lambda: _good_jpeg()[: len(_good_jpeg()) // 4], TRUNC, None),
    "jpeg_cut_in_header_4": (lambda: _good_jpeg()[:4], TRUNC, None),
    "jpeg_cut_in_header_20": (lambda: _good_jpeg()[:20], TRUNC, None),
    "jpeg_cut_at_300": (lambda: _good_jpeg()[:300], TRUNC, None),
    "jpeg_missing_last_bytes": (lambda: _good_jpeg()[:-3], TRUNC, None),
    "png_cut_half": (lambda: _good_png()[: len(_good_png()) // 2], TRUNC, None),
    "png_cut_at_100": (lambda: _good_png()[:100], TRUNC, None),
    "png_cut_in_ihdr": (lambda: _good_png()[:30], TRUNC, None),
    "empty": (lambda: b"", {"empty"}, None),
    "html_saved_as_jpg": (lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", {"not_an_image"}, None),
    "random_bytes": (lambda: np.random.default_rng(7).bytes(4096), {"not_an_image"}, None),
    "text": (lambda: "item_id,image_uri\nä,b\n".encode(), {"not_an_image"}, None),
    "too_large": (lambda: _good_jpeg(), {"too_large"}, DecodeLimits(max_bytes=10)),
    "one_pixel": (lambda: png_bytes(Image.new("RGB", (1, 1), RED)), {"too_small"}, None),
    "thin_strip": (lambda: png_bytes(Image.new("RGB", (100, 3), RED)), {"too_small"}, None),
    "bomb_30000": (lambda: _png_with_declared_size(30000, 30000), {"decompression_bomb"}, None),
    "bomb_10000": (lambda: _png_with_declared_size(10000, 10000), {"decompression_bomb"}, None),
    "over_max_pixels": (lambda: _png_with_declared_size(9000, 9000), {"decompression_bomb"}, None),
    "over_custom_max_pixels": (lambda: _good_png(), {"decompression_bomb"}, DecodeLimits(max_pixels=100)),
}


@pytest.mark.parametrize("with_prep", [False, True], ids=["no_prep", "prep"])
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_input_raises_only_decode_error_of_expected_type(name, with_prep):
    """Oracle: the documented error_type for each kind of damage; any other exception type fails the test."""
    make, allowed, limits = BROKEN[name]
    with pytest.raises(DecodeError) as info:
        decode_image(make(), Preprocessing(image_size=16) if with_prep else None, limits)
    assert info.value.error_type in allowed, str(info.value)
    assert info.value.error_type in ERROR_TYPES
    assert str(info.value)  # a message for the dead-letter table


def test_truncated_jpeg_at_any_cut_point_is_truncated_or_corrupt():
    """Oracle: every prefix of a JPEG that keeps its signature is damage (truncated/corrupt), never another type."""
    data = _good_jpeg()
    for cut in range(3, len(data) - 2, 7):
        with pytest.raises(DecodeError) as info:
            decode_image(data[:cut])
        assert info.value.error_type in TRUNC, (cut, str(info.value))


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    """Oracle: the header alone decides; pixel decoding (ImageFile.load) is never called and it returns at once."""
    loads = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    decode_image(_png_with_declared_size(16, 16))  # the spy does see a normal decode
    assert loads and set(loads) == {(16, 16)}
    loads.clear()
    for w, h in [(30000, 30000), (10000, 10000), (9000, 9000)]:
        start = time.perf_counter()
        with pytest.raises(DecodeError) as info:
            decode_image(_png_with_declared_size(w, h))
        assert time.perf_counter() - start < 0.5
        assert info.value.error_type == "decompression_bomb"
    assert loads == []


def test_fuzzed_images_decode_or_raise_decode_error():
    """Oracle: the contract; seeded byte flips and cuts of JPEG/PNG/GIF give an (S, S, 3) image or a DecodeError."""
    rng = np.random.default_rng(8)
    frames = [Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)]
    bases = [_good_jpeg(), _good_png(), _save(frames[0], "GIF", save_all=True, append_images=frames[1:])]
    prep = Preprocessing(image_size=16)
    for base in bases:
        for _ in range(150):
            data = bytearray(base)
            for _ in range(rng.integers(1, 6)):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
            if rng.random() < 0.3:
                data = data[: rng.integers(1, len(data))]
            try:
                dec = decode_image(bytes(data), prep)
            except DecodeError as e:
                assert e.error_type in ERROR_TYPES
            else:
                assert dec.pixels.shape == (16, 16, 3) and dec.pixels.dtype == np.uint8


def test_float_image_in_unit_range_is_scaled_to_8_bit():
    """A float image with values in [0, 1] (mode F, e.g. a TIFF) spans 0..255, not 0..1."""
    arr = np.linspace(0, 1, 1024, dtype=np.float32).reshape(32, 32)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="F").save(buf, format="TIFF")
    pixels = decode_image(buf.getvalue()).pixels
    assert pixels.max() == 255 and pixels.min() == 0
    np.testing.assert_allclose(pixels[..., 0], np.round(arr * 255), atol=1)
