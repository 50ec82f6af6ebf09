"""Catalog reading (CSV, JSONL, Parquet) against hand-written expected rows, and ReadCatalog on the local runner."""

from __future__ import annotations

import csv
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from conftest import LOCAL_RUNNER

from pipelines.transforms.catalog import CatalogError, ReadCatalog, catalog_format, iter_raw_rows, normalise_row

# The same five catalog rows in every format. Prices are numbers in JSONL/Parquet and text in CSV.
ROWS = [
    {"item_id": "a1", "image_uri": "images/a1.jpg", "product_id": "p1", "price": 10},
    {"item_id": "a2", "image_uri": "images/sub dir/a2.png", "product_id": "p1", "price": 12},
    {"item_id": "ü-日本-42", "image_uri": "bilder/größe.jpg", "product_id": "p2", "price": 7},
    {"item_id": "abs", "image_uri": "/data/photos/abs.jpg", "product_id": "p3", "price": 0},
    {"item_id": "remote", "image_uri": "gs://bucket/cat/remote.jpg", "product_id": "p3", "price": 99},
]


def _write_csv(path, rows, fieldnames=None) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def _write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def _write_bytes(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _normalised(path: str) -> list[dict]:
    """Every row of a catalog through iter_raw_rows + normalise_row; errors fail loudly."""
    out = []
    for n, raw, error in iter_raw_rows(path):
        assert error is None, (n, error)
        row, reason = normalise_row(raw, os.path.dirname(path))
        assert reason is None, (n, reason)
        out.append(row)
    return out


def _expected(base: str) -> list[dict]:
    return [
        {
            "item_id": "a1",
            "image_uri": os.path.join(base, "images/a1.jpg"),
            "catalog": {"product_id": "p1", "price": "10"},
        },
        {
            "item_id": "a2",
            "image_uri": os.path.join(base, "images/sub dir/a2.png"),
            "catalog": {"product_id": "p1", "price": "12"},
        },
        {
            "item_id": "ü-日本-42",
            "image_uri": os.path.join(base, "bilder/größe.jpg"),
            "catalog": {"product_id": "p2", "price": "7"},
        },
        {"item_id": "abs", "image_uri": "/data/photos/abs.jpg", "catalog": {"product_id": "p3", "price": "0"}},
        {
            "item_id": "remote",
            "image_uri": "gs://bucket/cat/remote.jpg",
            "catalog": {"product_id": "p3", "price": "99"},
        },
    ]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "path, fmt",
    [
        ("c.csv", "csv"),
        ("C.CSV", "csv"),
        ("c.jsonl", "jsonl"),
        ("c.ndjson", "jsonl"),
        ("c.json", "jsonl"),
        ("c.parquet", "parquet"),
        ("c.pq", "parquet"),
        ("gs://b/dir.v2/c.parquet", "parquet"),
    ],
)
def test_catalog_format_from_extension(path, fmt):
    """Oracle: the extension table in the docstring."""
    assert catalog_format(path) == fmt


def test_same_catalog_in_csv_jsonl_parquet_gives_same_rows(tmp_path):
    """Oracle: hand-written normalised rows; all three formats must produce exactly them, in order."""
    base = str(tmp_path)
    csv_rows = [{k: str(v) for k, v in r.items()} for r in ROWS]
    paths = [
        _write_csv(tmp_path / "cat.csv", csv_rows),
        _write_jsonl(tmp_path / "cat.jsonl", ROWS),
        _write_parquet(tmp_path / "cat.parquet", ROWS),
    ]
    expected = _expected(base)
    for path in paths:
        assert _normalised(path) == expected, path


def test_row_numbers(tmp_path):
    """Oracle: CSV counts the header as line 1; JSONL counts lines from 1; Parquet counts records from 1."""
    csv_path = _write_csv(tmp_path / "cat.csv", [{k: str(v) for k, v in r.items()} for r in ROWS])
    assert [n for n, _, _ in iter_raw_rows(csv_path)] == [2, 3, 4, 5, 6]
    assert [n for n, _, _ in iter_raw_rows(_write_jsonl(tmp_path / "cat.jsonl", ROWS))] == [1, 2, 3, 4, 5]
    assert [n for n, _, _ in iter_raw_rows(_write_parquet(tmp_path / "cat.parquet", ROWS))] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("img/x.jpg", "{base}/img/x.jpg"),
        ("  img/x.jpg  ", "{base}/img/x.jpg"),
        ("x.jpg", "{base}/x.jpg"),
        ("/abs/x.jpg", "/abs/x.jpg"),
        ("gs://bucket/x.jpg", "gs://bucket/x.jpg"),
        ("s3://bucket/dir/x.jpg", "s3://bucket/dir/x.jpg"),
        ("https://cdn.example.com/x.jpg", "https://cdn.example.com/x.jpg"),
    ],
)
def test_image_uri_resolution(tmp_path, uri, expected):
    """Oracle: relative URIs join the catalog's directory; absolute paths and scheme URIs pass through."""
    row, reason = normalise_row({"item_id": "i", "image_uri": uri}, str(tmp_path))
    assert reason is None
    assert row["image_uri"] == expected.format(base=str(tmp_path))


def test_relative_uri_resolves_against_catalog_directory_not_cwd(tmp_path, monkeypatch):
    """Oracle: the catalog's own directory, whatever the working directory is."""
    sub = tmp_path / "catalogs" / "v1"
    sub.mkdir(parents=True)
    path = _write_csv(sub / "cat.csv", [{"item_id": "a", "image_uri": "../images/a.jpg"}])
    monkeypatch.chdir(tmp_path)
    (row,) = _normalised(path)
    assert os.path.normpath(row["image_uri"]) == str(tmp_path / "catalogs" / "images" / "a.jpg")


def test_remote_catalog_directory_is_joined_with_slashes():
    """Oracle: gs:// base directory + relative path, joined with '/'."""
    row, reason = normalise_row({"item_id": "i", "image_uri": "img/x.jpg"}, "gs://bucket/catalogs")
    assert reason is None and row["image_uri"] == "gs://bucket/catalogs/img/x.jpg"


# ---------------------------------------------------------------- malformed rows


def test_malformed_csv_rows_become_per_row_errors(tmp_path):
    """Oracle: a hand-labelled CSV; each bad line is its own error and the good lines after it are still read."""
    data = (
        b"item_id,image_uri,product_id\n"  # line 1
        b"a,img/a.jpg,p1\n"  # 2: good
        b"b,img/b.jpg,p2,EXTRA\n"  # 3: too many fields
        b"c,img/c.jpg\n"  # 4: too few fields
        b'd,"img/d,1.jpg","multi\nline"\n'  # 5-6: one record, quoted comma and newline
        b",img/e.jpg,p5\n"  # 7: empty item_id
        b"f,,p6\n"  # 8: empty image_uri
        b"  ,img/g.jpg,p7\n"  # 9: blank item_id
        b"h,img/h.jpg,p8\n"  # 10: good
    )
    path = _write_bytes(tmp_path / "cat.csv", data)
    raw = list(iter_raw_rows(path))
    assert [n for n, _, _ in raw] == [2, 3, 4, 6, 7, 8, 9, 10]
    errors = {n: e for n, r, e in raw if e is not None}
    assert set(errors) == {3, 4}
    assert "4 fields" in errors[3] and "3" in errors[3]
    assert "fewer fields" in errors[4]
    rows = {n: r for n, r, _ in raw if r is not None}
    assert rows[6] == {"item_id": "d", "image_uri": "img/d,1.jpg", "product_id": "multi\nline"}
    reasons = {n: normalise_row(rows[n], str(tmp_path))[1] for n in rows}
    assert reasons[2] is None and reasons[6] is None and reasons[10] is None
    assert "item_id" in reasons[7] and "item_id" in reasons[9]
    assert "image_uri" in reasons[8]


def test_non_utf8_csv_bytes_keep_the_row(tmp_path):
    """Oracle: a bad byte becomes U+FFFD; the row and the rows after it are not lost."""
    data = b"item_id,image_uri,colour\nx\xff1,img/x\xfe.jpg,r\xe9d\ny,img/y.jpg,blue\n"
    path = _write_bytes(tmp_path / "cat.csv", data)
    rows = [normalise_row(r, str(tmp_path))[0] for _, r, e in iter_raw_rows(path) if e is None]
    assert [r["item_id"] for r in rows] == ["x\ufffd1", "y"]
    assert rows[0]["image_uri"].endswith("img/x\ufffd.jpg")
    assert rows[0]["catalog"] == {"colour": "r\ufffdd"}


def test_csv_with_bom_and_crlf(tmp_path):
    """Oracle: a UTF-8 BOM is not part of the first column name; CRLF line ends are not part of values."""
    data = "\ufeffitem_id,image_uri\r\nä,img/ä.jpg\r\n".encode()
    (row,) = _normalised(_write_bytes(tmp_path / "cat.csv", data))
    assert row["item_id"] == "ä" and row["image_uri"] == os.path.join(str(tmp_path), "img/ä.jpg")


def test_malformed_jsonl_lines_become_per_row_errors(tmp_path):
    """Oracle: a hand-labelled JSONL file; blank lines are skipped but counted."""
    lines = [
        b'{"item_id": "a", "image_uri": "a.jpg"}',  # 1: good
        b"not json at all",  # 2
        b"[1, 2, 3]",  # 3: a list
        b"",  # 4: blank, skipped
        b'"just a string"',  # 5: not an object
        b'{"item_id": "b", "image_uri": "b.jpg", "n": 3, "tags": ["x"]}',  # 6: good
        b'{"item_id": "c"}',  # 7: no image_uri
        b'{"item_id": "d", "image_uri": "d.jpg"',  # 8: cut off
        b'{"item_id": "e\xff", "image_uri": "e.jpg"}',  # 9: invalid UTF-8
        b'{"item_id": 17, "image_uri": "f.jpg"}',  # 10: numeric id
    ]
    path = _write_bytes(tmp_path / "cat.jsonl", b"\n".join(lines) + b"\n")
    raw = list(iter_raw_rows(path))
    assert [n for n, _, _ in raw] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    errors = {n: e for n, r, e in raw if e is not None}
    assert set(errors) == {2, 3, 5, 8, 9}
    assert "invalid JSON" in errors[2] and "object" in errors[3] and "object" in errors[5]
    rows = {n: r for n, r, _ in raw if r is not None}
    normalised = {n: normalise_row(r, str(tmp_path)) for n, r in rows.items()}
    assert normalised[6][0]["catalog"] == {"n": "3", "tags": "['x']"}
    assert normalised[7] == (None, "image_uri is missing or empty")
    assert normalised[10][0]["item_id"] == "17"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"image_uri": "a.jpg"}, "item_id"),
        ({"item_id": None, "image_uri": "a.jpg"}, "item_id"),
        ({"item_id": "", "image_uri": "a.jpg"}, "item_id"),
        ({"item_id": " \t", "image_uri": "a.jpg"}, "item_id"),
        ({"item_id": "a"}, "image_uri"),
        ({"item_id": "a", "image_uri": None}, "image_uri"),
        ({"item_id": "a", "image_uri": "  "}, "image_uri"),
    ],
)
def test_missing_required_field_gives_reason(row, field):
    """Oracle: the reason names the missing field."""
    assert normalise_row(row, "/base") == (None, f"{field} is missing or empty")


def test_parquet_null_fields_and_extras(tmp_path):
    """Oracle: null required fields give a reason; null extras are dropped, others become strings."""
    rows = [
        {"item_id": "a", "image_uri": "a.jpg", "size": 3, "note": None},
        {"item_id": None, "image_uri": "b.jpg", "size": 4, "note": "x"},
    ]
    path = _write_parquet(tmp_path / "cat.parquet", rows)
    (_, r1, _), (_, r2, _) = iter_raw_rows(path)
    assert normalise_row(r1, str(tmp_path))[0]["catalog"] == {"size": "3"}
    assert normalise_row(r2, str(tmp_path)) == (None, "item_id is missing or empty")


# ---------------------------------------------------------------- whole-file errors


def _raises_catalog_error(path: str, *fragments: str) -> None:
    with pytest.raises(CatalogError) as info:
        list(iter_raw_rows(path))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_unknown_extension_is_a_catalog_error(tmp_path):
    """Oracle: CatalogError naming the extension, raised before the file is touched."""
    path = _write_bytes(tmp_path / "cat.txt", b"item_id,image_uri\na,b\n")
    _raises_catalog_error(path, ".txt")
    with pytest.raises(CatalogError, match="unknown catalog format"):
        catalog_format(path)


@pytest.mark.parametrize("name", ["missing.csv", "missing.jsonl", "missing.parquet"])
def test_missing_file_is_a_catalog_error(tmp_path, name):
    """Oracle: CatalogError saying the file does not exist (not FileNotFoundError)."""
    _raises_catalog_error(str(tmp_path / name), "does not exist", name)


def test_csv_without_image_uri_column_is_a_catalog_error(tmp_path):
    """Oracle: CatalogError naming the missing column."""
    path = _write_csv(tmp_path / "cat.csv", [{"item_id": "a", "url": "a.jpg"}])
    _raises_catalog_error(path, "image_uri", "missing required columns")


def test_empty_csv_is_a_catalog_error(tmp_path):
    """Oracle: no header means no required columns."""
    _raises_catalog_error(_write_bytes(tmp_path / "cat.csv", b""), "item_id", "image_uri")


def test_parquet_without_item_id_is_a_catalog_error(tmp_path):
    """Oracle: CatalogError naming the missing column."""
    path = _write_parquet(tmp_path / "cat.parquet", [{"sku": "a", "image_uri": "a.jpg"}])
    _raises_catalog_error(path, "item_id", "missing required columns")


# ---------------------------------------------------------------- ReadCatalog on the local runner


def test_read_catalog_keeps_first_duplicate_and_loses_nothing(tmp_path):
    """Oracle: a hand-labelled CSV. First occurrence by row number kept; later ones, unparseable rows and rows
    missing a field are dead letters; kept rows + dead letters == all input rows."""
    data = (
        "item_id,image_uri,product_id\n"
        "a,img/a1.jpg,p1\n"  # 2: kept
        "b,img/b1.jpg,p2\n"  # 3: kept
        "a,img/a2.jpg,p1\n"  # 4: duplicate of 2
        "c,img/c1.jpg,p3\n"  # 5: kept
        " a ,img/a3.jpg,p1\n"  # 6: duplicate of 2 after stripping
        "d,,p4\n"  # 7: missing image_uri
        "e,img/e.jpg,p5,EXTRA\n"  # 8: too many fields
        "b,img/b2.jpg,p2\n"  # 9: duplicate of 3
    )
    path = _write_bytes(tmp_path / "cat.csv", data.encode())
    n_input = 8
    with beam.Pipeline(runner=LOCAL_RUNNER) as p:
        rows, dead = p | ReadCatalog(path, "run1")
        kept = rows | "Kept" >> beam.Map(lambda r: (r["item_id"], os.path.basename(r["image_uri"]), r["row_number"]))
        assert_that(kept, equal_to([("a", "a1.jpg", 2), ("b", "b1.jpg", 3), ("c", "c1.jpg", 5)]), label="rows")
        dead_keys = dead | "DeadKeys" >> beam.Map(
            lambda d: (
                d["item_id"],
                d["stage"],
                d["error_type"],
                d["run_id"],
                os.path.basename(d["image_uri"]) if d["image_uri"] else None,
            )
        )
        assert_that(
            dead_keys,
            equal_to(
                [
                    ("a", "read_catalog", "duplicate_item_id", "run1", "a2.jpg"),
                    ("a", "read_catalog", "duplicate_item_id", "run1", "a3.jpg"),
                    ("b", "read_catalog", "duplicate_item_id", "run1", "b2.jpg"),
                    ("d", "read_catalog", "missing_field", "run1", None),
                    (None, "read_catalog", "malformed_row", "run1", None),
                ]
            ),
            label="dead",
        )
        total = (rows, dead) | "All" >> beam.Flatten() | "Count" >> beam.combiners.Count.Globally()
        assert_that(total, equal_to([n_input]), label="nothing_lost")


def test_read_catalog_dead_letter_item_ids_are_strings(tmp_path):
    """Oracle: the dead-letter table's item_id column is a string, so a numeric JSONL id must arrive as text."""
    lines = ['{"item_id": 42}', '{"item_id": "ok", "image_uri": "ok.jpg"}', "not json"]
    path = _write_bytes(tmp_path / "cat.jsonl", "\n".join(lines).encode())
    with beam.Pipeline(runner=LOCAL_RUNNER) as p:
        rows, dead = p | ReadCatalog(path, "run1")
        assert_that(rows | "Ids" >> beam.Map(lambda r: r["item_id"]), equal_to(["ok"]), label="rows")
        assert_that(
            dead | "DeadIds" >> beam.Map(lambda d: (d["item_id"], d["error_type"])),
            equal_to([("42", "missing_field"), (None, "malformed_row")]),
            label="dead",
        )


@pytest.mark.parametrize("partitions,flush_rows", [(1, 1), (3, 2), (1024, 128)])
def test_read_catalog_dedupes_across_flushed_partition_lists(tmp_path, partitions, flush_rows):
    """Oracle: the first row of each id by line number, computed in plain Python. Small partitions and flushes
    split one id's rows over several lists of its partition; the kept row must not depend on that."""
    rng = np.random.default_rng(7)
    ids = [f"id{int(i)}" for i in rng.integers(0, 15, 60)]
    lines = ["item_id,image_uri"] + [f"{item},img/{n}.jpg" for n, item in enumerate(ids)]
    path = _write_bytes(tmp_path / "cat.csv", "\n".join(lines).encode())
    first: dict[str, int] = {}
    for n, item in enumerate(ids):
        first.setdefault(item, n)
    expected_kept = sorted((item, f"{n}.jpg") for item, n in first.items())
    expected_dead = sorted(f"{n}.jpg" for n, item in enumerate(ids) if first[item] != n)
    with beam.Pipeline(runner=LOCAL_RUNNER) as p:
        rows, dead = p | ReadCatalog(path, "run1", partitions=partitions, flush_rows=flush_rows)
        kept = rows | "Kept" >> beam.Map(lambda r: (r["item_id"], os.path.basename(r["image_uri"])))
        assert_that(kept, equal_to(expected_kept), label="rows")
        dups = dead | "Dups" >> beam.Map(lambda d: os.path.basename(d["image_uri"]))
        assert_that(dups, equal_to(expected_dead), label="dead")


def test_read_catalog_refuses_empty_partitions():
    with pytest.raises(ValueError, match="partitions and flush_rows must be >= 1"):
        ReadCatalog("cat.csv", "run1", partitions=0)
