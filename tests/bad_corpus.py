"""A generated corpus of bad (and awkward but valid) catalog rows and images, each with its expected outcome.

``write_bad_corpus(root)`` writes the images and a CSV catalog under ``root`` and returns the catalog's path and
one ``Case`` per catalog record. Everything is generated here with PIL, numpy and plain bytes; nothing is
downloaded. The catalog is written as raw bytes, the way a spreadsheet export arrives: a UTF-8 byte-order mark,
CRLF line endings, a blank line (not a record), a Latin-1 byte, quoted fields with commas and line breaks, and
lines with too many or too few fields.

``Case.expected`` is ``INDEXED`` (exactly one feature row) or ``(stage, error_type)`` (exactly one dead-letter
row at that stage; ``error_type`` None when only the stage is fixed, ``Case.error_types`` then lists the
acceptable ones if there is a short list).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

INDEXED = "indexed"
# Every error_type decode_image documents; a decode Case without a fixed error_type must end as one of these.
DECODE_ERROR_TYPES = ("empty", "too_large", "not_an_image", "decompression_bomb", "too_small", "truncated", "corrupt")
LOCKED_IMAGE = os.path.join("images", "locked.jpg")  # chmod 000 by write_bad_corpus; see unlock()
UNICODE_ID = "jupe-\u00e9t\u00e9-\U0001f457"  # jupe-été-👗


@dataclass(frozen=True)
class Case:
    """One catalog record and what the pipeline must make of it.

    Attributes:
        item_id: the id as the output tables hold it: stripped in the feature table, as written in the catalog
            for a ``read_catalog`` dead letter; None for a line too malformed to have one (counted by row).
        kind: what is awkward about the record.
        expected: ``INDEXED`` or ``(stage, error_type or None)``.
        error_types: when ``expected``'s error_type is None, the acceptable ones (empty: any).
    """

    item_id: str | None
    kind: str
    expected: str | tuple[str, str | None]
    error_types: tuple[str, ...] = ()

    @property
    def indexed(self) -> bool:
        return self.expected == INDEXED


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Blocky random RGB content: different seeds give clearly different images (and embeddings)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    arr = np.kron(blocks, np.ones((8, 8, 1), np.uint8))[: size[1], : size[0]]
    return Image.fromarray(np.ascontiguousarray(arr))


def _jpeg(seed: int, size: tuple[int, int] = (48, 40), **kw) -> bytes:
    return _save(_photo(seed, size), "JPEG", quality=90, **kw)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims width x height pixels (IHDR patched, its CRC recomputed)."""
    data = bytearray(_save(Image.new("L", (4, 4)), "PNG"))
    # Signature (8 bytes), then the IHDR chunk: length (4), type (4), data (13: width, height, ...), CRC (4).
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _png_bad_crc() -> bytes:
    data = bytearray(_save(_photo(40, (16, 16)), "PNG"))
    data[29] ^= 0xFF  # first byte of the IHDR CRC
    return bytes(data)


def _animated_gif() -> bytes:
    frames = [_photo(seed, (32, 24)).convert("P") for seed in (21, 22, 23)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (24, 24), 0)
    img.putpalette([255, 255, 255, 200, 30, 30, 30, 30, 200] + [0] * (768 - 9))
    img.paste(1, (0, 0, 12, 24))
    img.paste(2, (12, 12, 24, 24))
    return _save(img, "PNG", transparency=0)


def _exif_rotated() -> bytes:
    """Stored 40x20 landscape with EXIF orientation 6: displayed 20x40 portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_photo(12, (40, 20)), "JPEG", quality=90, exif=exif)


def _grey16() -> bytes:
    arr = (np.add.outer(np.arange(32), np.arange(40)) * 800).astype(np.uint16)  # uses the full 16-bit range
    return _save(Image.fromarray(arr), "PNG")  # mode I;16


def _line(*fields: bytes) -> bytes:
    return b",".join(fields)


def write_bad_corpus(root: str) -> tuple[str, list[Case]]:
    """Write images and a raw-bytes CSV catalog under ``root``; return the catalog's path and the cases.

    The image ``images/locked.jpg`` is left with mode 000: call ``unlock(root)`` when done.
    """
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    truncated_jpeg = _jpeg(30, (64, 64))
    truncated_png = _save(_photo(31), "PNG")
    files: dict[str, bytes] = {
        "good-1.jpg": _jpeg(1),
        "good-2.jpg": _jpeg(2),
        "good-3.jpg": _jpeg(3, (80, 60)),
        "dup-first.jpg": _jpeg(4),
        "dup-second.jpg": _jpeg(5),
        "padded.jpg": _jpeg(6),
        "padded-dup.jpg": _jpeg(7),
        "dup-broken-second.jpg": _jpeg(8),
        "png-named.jpg": _save(_photo(9), "PNG"),
        "cmyk.jpg": _save(_photo(10).convert("CMYK"), "JPEG", quality=90),
        "grey.jpg": _save(_photo(11).convert("L"), "JPEG", quality=90),
        "exif6.jpg": _exif_rotated(),
        "progressive.jpg": _jpeg(13, (64, 48), progressive=True),
        "grey16.png": _grey16(),
        "palette-alpha.png": _palette_with_transparency(),
        "rgba.png": _save(_photo(14).convert("RGBA"), "PNG"),
        "animated.gif": _animated_gif(),
        "picture.bmp": _save(_photo(15), "BMP"),
        f"{UNICODE_ID}.jpg": _jpeg(16),
        "extra-cols.jpg": _jpeg(17),
        "latin1.jpg": _jpeg(18),
        "multiline.jpg": _jpeg(19),
        "absolute.jpg": _jpeg(20),
        "file-uri.jpg": _jpeg(24),
        "locked.jpg": _jpeg(25),
        "truncated.jpg": truncated_jpeg[: len(truncated_jpeg) // 2],
        "truncated.png": truncated_png[: len(truncated_png) // 2],
        "zero.jpg": b"",
        "html.jpg": b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>denied</body></html>\n",
        "text.png": b"this is a text file with a .png extension\n",
        "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="9" height="9"/></svg>',
        "bomb.png": _png_claiming(30000, 30000),  # 900 Mpx: over twice PIL's MAX_IMAGE_PIXELS, an error in PIL
        "bomb-warn.png": _png_claiming(12000, 12000),  # 144 Mpx: PIL only warns; decode_image makes it an error
        "bomb-limit.png": _png_claiming(9000, 9000),  # 81 Mpx: under PIL's limits, over DecodeLimits.max_pixels
        "one-pixel.png": _save(Image.new("RGB", (1, 1), (200, 0, 0)), "PNG"),
        "sliver.png": _save(Image.new("RGB", (1000, 4), (0, 200, 0)), "PNG"),
        "gif-header-cut.gif": _animated_gif()[:12],
        "jpeg-magic-garbage.jpg": b"\xff\xd8\xff" + bytes(np.random.default_rng(26).integers(0, 256, 2000, np.uint8)),
        "bad-crc.png": _png_bad_crc(),
    }
    for name, data in files.items():
        with open(os.path.join(images, name), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(images, "a-directory.jpg"), exist_ok=True)
    os.symlink("no-such-target.jpg", os.path.join(images, "dangling.jpg"))
    os.symlink("loop-b.jpg", os.path.join(images, "loop-a.jpg"))
    os.symlink("loop-a.jpg", os.path.join(images, "loop-b.jpg"))
    os.chmod(os.path.join(root, LOCKED_IMAGE), 0)
    as_root = os.geteuid() == 0  # root (as on CI) opens a mode-000 file anyway: then it is simply indexed

    absolute = os.path.abspath(os.path.join(images, "absolute.jpg")).encode()
    file_uri = b"file://" + os.path.abspath(os.path.join(images, "file-uri.jpg")).encode()
    uid = UNICODE_ID.encode()
    # (catalog line, case); None as the case: a line that is not a record (blank line).
    records: list[tuple[bytes, Case | None]] = [
        (_line(b"good-1", b"images/good-1.jpg", b"p1", b""), Case("good-1", "plain JPEG", INDEXED)),
        (_line(b"good-2", b"images/good-2.jpg", b"p2", b""), Case("good-2", "plain JPEG", INDEXED)),
        (_line(b"good-3", b"images/good-3.jpg", b"p3", b""), Case("good-3", "plain JPEG", INDEXED)),
        # -- decode: awkward but valid images -------------------------------------------------------------
        (
            _line(b"png-named-jpg", b"images/png-named.jpg", b"p4", b""),
            Case("png-named-jpg", "PNG bytes with a .jpg extension", INDEXED),
        ),
        (_line(b"cmyk", b"images/cmyk.jpg", b"p5", b""), Case("cmyk", "CMYK JPEG", INDEXED)),
        (_line(b"grey-jpeg", b"images/grey.jpg", b"p6", b""), Case("grey-jpeg", "greyscale JPEG", INDEXED)),
        (
            _line(b"exif6", b"images/exif6.jpg", b"p7", b""),
            Case("exif6", "EXIF-rotated JPEG (orientation 6)", INDEXED),
        ),
        (
            _line(b"progressive", b"images/progressive.jpg", b"p8", b""),
            Case("progressive", "progressive JPEG", INDEXED),
        ),
        (_line(b"grey16", b"images/grey16.png", b"p9", b""), Case("grey16", "16-bit greyscale PNG", INDEXED)),
        (
            _line(b"palette-alpha", b"images/palette-alpha.png", b"p10", b""),
            Case("palette-alpha", "palette PNG with transparency", INDEXED),
        ),
        (_line(b"rgba", b"images/rgba.png", b"p11", b""), Case("rgba", "RGBA PNG", INDEXED)),
        (
            _line(b"animated", b"images/animated.gif", b"p12", b""),
            Case("animated", "animated GIF (first frame)", INDEXED),
        ),
        (_line(b"bmp", b"images/picture.bmp", b"p13", b""), Case("bmp", "BMP", INDEXED)),
        # -- decode: images that must be dead letters -----------------------------------------------------
        (
            _line(b"truncated-jpeg", b"images/truncated.jpg", b"p14", b""),
            Case("truncated-jpeg", "truncated JPEG", ("decode", "truncated")),
        ),
        (
            _line(b"truncated-png", b"images/truncated.png", b"p15", b""),
            Case("truncated-png", "truncated PNG", ("decode", "truncated")),
        ),
        (_line(b"zero", b"images/zero.jpg", b"p16", b""), Case("zero", "zero bytes", ("decode", "empty"))),
        (
            _line(b"html", b"images/html.jpg", b"p17", b""),
            Case("html", "HTML error page saved as .jpg", ("decode", "not_an_image")),
        ),
        (
            _line(b"text-png", b"images/text.png", b"p18", b""),
            Case("text-png", "text file with a .png extension", ("decode", "not_an_image")),
        ),
        (
            _line(b"svg-png", b"images/svg.png", b"p19", b""),
            Case("svg-png", "SVG with a .png extension", ("decode", "not_an_image")),
        ),
        (
            _line(b"bomb", b"images/bomb.png", b"p20", b""),
            Case("bomb", "decompression bomb: PNG IHDR claims 30000x30000", ("decode", "decompression_bomb")),
        ),
        (
            _line(b"bomb-warn", b"images/bomb-warn.png", b"p21", b""),
            Case(
                "bomb-warn", "decompression bomb in PIL's warning band (12000x12000)", ("decode", "decompression_bomb")
            ),
        ),
        (
            _line(b"bomb-limit", b"images/bomb-limit.png", b"p22", b""),
            Case("bomb-limit", "over the pipeline's pixel limit only (9000x9000)", ("decode", "decompression_bomb")),
        ),
        (
            _line(b"one-pixel", b"images/one-pixel.png", b"p23", b""),
            Case("one-pixel", "1x1 image", ("decode", "too_small")),
        ),
        (
            _line(b"sliver", b"images/sliver.png", b"p24", b""),
            Case("sliver", "1000x4 sliver", ("decode", "too_small")),
        ),
        (
            _line(b"gif-cut", b"images/gif-header-cut.gif", b"p25", b""),
            Case("gif-cut", "GIF truncated inside its header", ("decode", None), ("corrupt", "truncated")),
        ),
        (
            _line(b"jpeg-garbage", b"images/jpeg-magic-garbage.jpg", b"p26", b""),
            Case(
                "jpeg-garbage",
                "JPEG magic number followed by random bytes",
                ("decode", None),
                ("corrupt", "truncated"),  # PIL follows segment lengths read from the garbage off the end
            ),
        ),
        (
            _line(b"bad-crc", b"images/bad-crc.png", b"p27", b""),
            Case("bad-crc", "PNG with a corrupted IHDR CRC", ("decode", "corrupt")),
        ),
        # -- read ---------------------------------------------------------------------------------------------
        (
            _line(b"missing", b"images/not-there.jpg", b"p28", b""),
            Case("missing", "missing file", ("read", "not_found")),
        ),
        (
            _line(b"dangling", b"images/dangling.jpg", b"p29", b""),
            Case("dangling", "dangling symlink", ("read", "not_found")),
        ),
        (
            _line(b"symlink-loop", b"images/loop-a.jpg", b"p30", b""),
            Case("symlink-loop", "symlink loop (ELOOP)", ("read", None)),
        ),
        (
            _line(b"directory", b"images/a-directory.jpg", b"p31", b""),
            Case("directory", "a directory as image_uri", ("read", "is_a_directory")),
        ),
        (
            _line(b"locked", b"images/locked.jpg", b"p32", b""),
            Case(
                "locked",
                "unreadable file (chmod 000): read/permission_denied, but indexed when running as root (euid 0)",
                INDEXED if as_root else ("read", "permission_denied"),
            ),
        ),
        (
            _line(b"unknown-scheme", b"ftp://example.invalid/x.jpg", b"p33", b""),
            Case("unknown-scheme", "URI scheme no filesystem handles (ftp://)", ("read", None)),
        ),
        (
            _line(b"nul-in-uri", b"images/nul\x00.jpg", b"p34", b""),
            Case("nul-in-uri", "NUL byte in image_uri", ("read", None)),
        ),
        # -- catalog values ---------------------------------------------------------------------------------
        (
            _line(uid, b"images/" + uid + b".jpg", b"p35", b""),
            Case(UNICODE_ID, "unicode item id and file name", INDEXED),
        ),
        (
            _line(b"extra-cols", b"images/extra-cols.jpg", b"p36", b'"red, with a comma"'),
            Case("extra-cols", "extra catalog columns (quoted comma)", INDEXED),
        ),
        (
            _line(b"latin1", b"images/latin1.jpg", b"p37", b"caf\xe9 cr\xe8me"),
            Case("latin1", "non-UTF-8 (Latin-1) bytes in an extra column", INDEXED),
        ),
        (b"", None),  # a blank line is not a record
        (
            _line(b"multiline", b"images/multiline.jpg", b"p38", b'"first line\r\nsecond line"'),
            Case("multiline", "quoted extra column spanning two lines", INDEXED),
        ),
        (
            _line(b"absolute", absolute, b"p39", b""),
            Case("absolute", "absolute image path", INDEXED),
        ),
        (_line(b"file-uri", file_uri, b"p40", b""), Case("file-uri", "file:// image URI", INDEXED)),
        (
            _line(b"  padded  ", b"  images/padded.jpg ", b"p41", b""),
            Case("padded", "item id and URI with surrounding spaces (stripped)", INDEXED),
        ),
        # -- catalog rows that must be dead letters -----------------------------------------------------------
        (
            _line(b"dup", b"images/dup-first.jpg", b"p42", b"first"),
            Case("dup", "duplicate item_id: first occurrence kept", INDEXED),
        ),
        (
            _line(b"dup", b"images/dup-second.jpg", b"p42", b"second"),
            Case("dup", "duplicate item_id: later occurrence", ("read_catalog", "duplicate_item_id")),
        ),
        (
            _line(b"padded", b"images/padded-dup.jpg", b"p43", b""),
            Case("padded", "duplicate item_id once spaces are stripped", ("read_catalog", "duplicate_item_id")),
        ),
        (
            _line(b"dup-broken", b"images/also-not-there.jpg", b"p44", b"first"),
            Case("dup-broken", "duplicate item_id whose first occurrence is unreadable", ("read", "not_found")),
        ),
        (
            _line(b"dup-broken", b"images/dup-broken-second.jpg", b"p44", b"second"),
            Case(
                "dup-broken", "readable later duplicate of an unreadable first", ("read_catalog", "duplicate_item_id")
            ),
        ),
        (
            _line(b"", b"images/good-1.jpg", b"p45", b""),
            Case("", "empty item_id", ("read_catalog", "missing_field")),
        ),
        (
            _line(b"   ", b"images/good-1.jpg", b"p46", b""),
            Case("   ", "item_id of spaces only", ("read_catalog", "missing_field")),
        ),
        (
            _line(b"no-uri", b"", b"p47", b""),
            Case("no-uri", "empty image_uri", ("read_catalog", "missing_field")),
        ),
        (
            _line(b"too-many", b"images/good-2.jpg", b"p48", b"x", b"y", b"z"),
            Case(None, "CSV line with too many fields", ("read_catalog", "malformed_row")),
        ),
        (
            _line(b"too-few", b"images/good-2.jpg"),
            Case(None, "CSV line with too few fields", ("read_catalog", "malformed_row")),
        ),
    ]
    path = os.path.join(root, "catalog.csv")
    lines = [b"\xef\xbb\xbfitem_id,image_uri,product_id,note"] + [line for line, _ in records]
    with open(path, "wb") as f:
        f.write(b"\r\n".join(lines) + b"\r\n")
    return path, [case for _, case in records if case is not None]


def unlock(root: str) -> None:
    """Give the mode-000 image its permissions back (so the directory can be inspected or removed)."""
    path = os.path.join(root, LOCKED_IMAGE)
    if os.path.exists(path):
        os.chmod(path, 0o644)
