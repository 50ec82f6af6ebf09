"""A generated corpus of bad (and awkward but valid) inputs, each with its expected outcome, run through
the whole pipeline once: every bad row is a dead-letter row with its stage and reason, every good row is
indexed exactly once, and nothing else is lost or duplicated."""

from __future__ import annotations

import glob
import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import LOCAL_RUNNER, jpeg_bytes
from PIL import Image

from pipelines.index_catalog import run

INDEXED = "indexed"


@dataclass(frozen=True)
class Case:
    item_id: str
    kind: str
    expected: str | tuple[str, str | None]  # INDEXED or (stage, error_type or None for "any")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(seed: int, size=(48, 40)) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes(seed, size))).convert("RGB")


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (IHDR patched, CRC recomputed)."""
    data = bytearray(_save(Image.new("L", (4, 4)), "PNG"))
    ihdr = 8 + 4  # signature, chunk length
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 4 + 13])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _animated_gif() -> bytes:
    frames = [Image.new("P", (32, 32), c) for c in (1, 2)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_photo(7, (40, 20)), "JPEG", exif=exif)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (24, 24), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 12, 24))
    return _save(img, "PNG", transparency=0)


def write_corpus(root: str) -> tuple[str, list[Case]]:
    """Write images and a raw-bytes CSV catalog under ``root``; return its path and the expected outcomes."""
    img = os.path.join(root, "images")
    os.makedirs(img, exist_ok=True)
    good_jpeg = jpeg_bytes(3)
    good_png = _save(_photo(4), "PNG")
    files: dict[str, bytes] = {
        "plain.jpg": jpeg_bytes(1),
        "plain2.jpg": jpeg_bytes(2),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "truncated.png": good_png[: len(good_png) // 2],
        "zero.jpg": b"",
        "html.jpg": b"<!DOCTYPE html><html><body>Access denied</body></html>",
        "png-named.jpg": good_png,
        "cmyk.jpg": _save(_photo(5).convert("CMYK"), "JPEG"),
        "grey16.png": _save(Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)), "PNG"),
        "palette-alpha.png": _palette_with_transparency(),
        "rgba.png": _save(_photo(6).convert("RGBA"), "PNG"),
        "grey.jpg": _save(_photo(8).convert("L"), "JPEG"),
        "animated.gif": _animated_gif(),
        "exif6.jpg": _exif_rotated(),
        "bomb.png": _png_bomb(30000, 30000),
        "one-pixel.png": _save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "text.png": b"just some text, not a picture\n",
        "gif-header-cut.gif": _animated_gif()[:12],
        "jupe-\u00e9t\u00e9-\U0001f457.jpg": jpeg_bytes(9),
        "locked.jpg": jpeg_bytes(10),
    }
    for name, data in files.items():
        with open(os.path.join(img, name), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(img, "a-directory.jpg"), exist_ok=True)
    os.chmod(os.path.join(img, "locked.jpg"), 0)
    root_user = os.geteuid() == 0  # root reads a chmod-000 file anyway

    cases = [
        Case("plain", "good JPEG", INDEXED),
        Case("truncated-jpeg", "truncated JPEG", ("decode", "truncated")),
        Case("truncated-png", "truncated PNG", ("decode", None)),
        Case("zero", "zero bytes", ("decode", "empty")),
        Case("html", "HTML saved as .jpg", ("decode", "not_an_image")),
        Case("png-named-jpg", "PNG with a .jpg extension", INDEXED),
        Case("cmyk", "CMYK JPEG", INDEXED),
        Case("grey16", "16-bit greyscale PNG", INDEXED),
        Case("palette-alpha", "palette PNG with transparency", INDEXED),
        Case("rgba", "RGBA PNG", INDEXED),
        Case("grey", "greyscale JPEG", INDEXED),
        Case("animated", "animated GIF (first frame)", INDEXED),
        Case("exif6", "EXIF orientation 6", INDEXED),
        Case("bomb", "decompression bomb (30000x30000 header)", ("decode", "decompression_bomb")),
        Case("one-pixel", "1x1 image", ("decode", "too_small")),
        Case("text-png", "text with a .png extension", ("decode", "not_an_image")),
        Case("gif-cut", "GIF cut inside its header", ("decode", None)),
        Case("missing", "missing file", ("read", "not_found")),
        Case("directory", "a directory as image_uri", ("read", None)),
        Case(
            "locked",
            "unreadable permission (readable by root)",
            INDEXED if root_user else ("read", "permission_denied"),
        ),
        Case("jupe-\u00e9t\u00e9-\U0001f457", "unicode item id and file name", INDEXED),
        Case("extra-cols", "extra catalog columns", INDEXED),
        Case("latin1", "non-UTF-8 bytes in a column", INDEXED),
        Case("dup", "duplicate item_id: first kept", INDEXED),
        Case("dup#2", "duplicate item_id: later row", ("read_catalog", "duplicate_item_id")),
        Case("<empty-id>", "empty item_id", ("read_catalog", "missing_field")),
        Case("no-uri", "empty image_uri", ("read_catalog", "missing_field")),
        Case("<malformed>", "CSV line with too many fields", ("read_catalog", "malformed_row")),
    ]
    lines = [
        b"item_id,image_uri,product_id,note",
        b"plain,images/plain.jpg,p1,",
        b"truncated-jpeg,images/truncated.jpg,p2,",
        b"truncated-png,images/truncated.png,p3,",
        b"zero,images/zero.jpg,p4,",
        b"html,images/html.jpg,p5,",
        b"png-named-jpg,images/png-named.jpg,p6,",
        b"cmyk,images/cmyk.jpg,p7,",
        b"grey16,images/grey16.png,p8,",
        b"palette-alpha,images/palette-alpha.png,p9,",
        b"rgba,images/rgba.png,p10,",
        b"grey,images/grey.jpg,p11,",
        b"animated,images/animated.gif,p12,",
        b"exif6,images/exif6.jpg,p13,",
        b"bomb,images/bomb.png,p14,",
        b"one-pixel,images/one-pixel.png,p15,",
        b"text-png,images/text.png,p16,",
        b"gif-cut,images/gif-header-cut.gif,p17,",
        b"missing,images/not-there.jpg,p18,",
        b"directory,images/a-directory.jpg,p19,",
        b"locked,images/locked.jpg,p20,",
        "jupe-\u00e9t\u00e9-\U0001f457,images/jupe-\u00e9t\u00e9-\U0001f457.jpg,p21,".encode(),
        b'extra-cols,images/plain2.jpg,p22,"has, a comma"',
        b"latin1,images/plain.jpg,p23,caf\xe9",
        b"dup,images/plain.jpg,p24,first",
        b"dup,images/plain2.jpg,p24,second",
        b",images/plain.jpg,p25,",
        b"no-uri,,p26,",
        b"malformed,images/plain.jpg,p27,x,y,z",
    ]
    path = os.path.join(root, "catalog.csv")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path, cases


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("corpus")
    catalog, cases = write_corpus(str(root / "c"))
    out = str(root / "out")
    report = run(
        [
            f"--catalog={catalog}",
            f"--output={out}",
            f"--bundle={tiny_bundle[0]}",
            f"--runner={LOCAL_RUNNER}",
            "--run_id=corpus",
        ]
    )
    features = pq.read_table(glob.glob(f"{out}/features/run=corpus/*.parquet")).to_pylist()
    dead = pq.read_table(glob.glob(f"{out}/dead_letter/run=corpus/*.parquet")).to_pylist()
    yield cases, report, features, dead
    os.chmod(str(root / "c" / "images" / "locked.jpg"), 0o644)


def test_corpus_has_at_least_20_kinds(corpus_run):
    cases, *_ = corpus_run
    assert len({c.kind for c in cases}) >= 20


def test_every_case_has_its_expected_outcome(corpus_run):
    cases, _, features, dead = corpus_run
    indexed = [r["item_id"] for r in features]
    by_item = {}
    for d in dead:
        if d["item_id"] is not None:  # None: a line too malformed to have an item id
            by_item.setdefault(d["item_id"] or "<empty-id>", []).append(d)
    malformed = [d for d in dead if d["error_type"] == "malformed_row"]
    for case in cases:
        if case.expected == INDEXED:
            assert indexed.count(case.item_id) == 1, case
            continue
        stage, error_type = case.expected
        if case.item_id == "<malformed>":
            rows = malformed
        else:
            rows = [d for d in by_item.get(case.item_id.split("#")[0], []) if d["stage"] == stage]
        assert len(rows) == 1, (case, by_item.get(case.item_id))
        assert rows[0]["stage"] == stage and rows[0]["error_message"], case
        if error_type is not None:
            assert rows[0]["error_type"] == error_type, (case, rows[0])


def test_nothing_lost_nothing_duplicated(corpus_run):
    cases, report, features, dead = corpus_run
    assert len(features) + len(dead) == len(cases)
    assert len({r["item_id"] for r in features}) == len(features)
    assert report["counts"]["indexed"] == len(features) and report["counts"]["dead_letter"] == len(dead)


def test_awkward_values_survive(corpus_run):
    _, _, features, _ = corpus_run
    rows = {r["item_id"]: r for r in features}
    assert dict(rows["extra-cols"]["catalog"]) == {"product_id": "p22", "note": "has, a comma"}
    assert dict(rows["latin1"]["catalog"])["note"] == "caf\ufffd"  # undecodable byte replaced, row kept
    assert dict(rows["dup"]["catalog"])["note"] == "first"
    assert (rows["exif6"]["width"], rows["exif6"]["height"]) == (20, 40)  # displayed size after rotation
