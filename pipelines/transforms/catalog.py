"""ReadCatalog: catalog file (CSV, JSONL or Parquet; local or remote) -> validated catalog rows.

A catalog row becomes ``{"item_id", "image_uri", "catalog": {other columns as strings}, "row_number"}``.
Rows without an item id or image URI, unparseable lines and repeated item ids
go to the dead-letter output; the first occurrence of a repeated id is kept.
"""

from __future__ import annotations

import csv
import json
import zlib
from collections import defaultdict
from collections.abc import Iterator

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipelines.transforms.dead_letter import DEAD_LETTER_TAG, tagged_dead_letter
from retrieval_core import io as rio
from schemas import REQUIRED_CATALOG_COLUMNS

FORMATS = ("csv", "jsonl", "parquet")

DEDUPE_PARTITIONS = 1024
"""Partitions of the de-duplication shuffle: up to this many workers de-duplicate, each holding its partition's
rows (catalog rows / 1,024) at once. Decoding and inference do not inherit the bound: ReadAndDecode spreads its
chunks again."""

FLUSH_ROWS = 128
"""Rows a partition gathers while the file is parsed before they go on as one list: the shuffle moves lists,
not one record per row, and the parser holds at most ``partitions * FLUSH_ROWS`` rows."""


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (missing file, unknown format, no required columns)."""


def catalog_format(path: str) -> str:
    """Format from the file extension: .csv, .jsonl/.json/.ndjson, .parquet/.pq."""
    ext = path.lower().rsplit(".", 1)[-1]
    fmt = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "json": "jsonl", "parquet": "parquet", "pq": "parquet"}
    if ext not in fmt:
        raise CatalogError(f"{path}: unknown catalog format .{ext}; use one of .csv, .jsonl, .parquet")
    return fmt[ext]


def iter_raw_rows(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield ``(row_number, row, error)`` for each record; exactly one of row and error is None."""
    fmt = catalog_format(path)
    if not rio.exists(path):
        raise CatalogError(f"catalog {path} does not exist")
    if fmt == "parquet":
        with rio.open_read(path) as f:
            table = pq.read_table(f)
        missing = [c for c in REQUIRED_CATALOG_COLUMNS if c not in table.column_names]
        if missing:
            raise CatalogError(f"{path}: missing required columns {missing}; found {table.column_names}")
        for n, row in enumerate(table.to_pylist(), start=1):
            yield n, row, None
        return
    data = rio.read_bytes(path)
    if fmt == "jsonl":
        for n, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield n, None, f"invalid JSON: {e}"
                continue
            yield ((n, row, None) if isinstance(row, dict) else (n, None, "a JSON line must be an object"))
        return
    text = data.decode("utf-8-sig", errors="replace")  # bad bytes become U+FFFD, never a lost catalog
    yield from _iter_csv(path, text.splitlines(keepends=True))


def _iter_csv(path: str, lines: list[str]) -> Iterator[tuple[int, dict | None, str | None]]:
    """Strict CSV parsing that survives a broken record.

    The csv module's lenient mode lets an unclosed quote swallow the rest of the file into one field,
    silently. Here a record that fails strict parsing becomes an error for its first physical line, and
    parsing resumes on the next line, so one bad line costs one row.
    """
    header_reader = csv.reader(lines, strict=True)
    try:
        fieldnames = next(header_reader, None)
    except csv.Error as e:
        raise CatalogError(f"{path}: unreadable CSV header: {e}") from e
    missing = [c for c in REQUIRED_CATALOG_COLUMNS if c not in (fieldnames or [])]
    if missing:
        raise CatalogError(f"{path}: missing required columns {missing}; header is {fieldnames}")
    pos = header_reader.line_num  # index of the first physical line not yet parsed
    while pos < len(lines):
        reader = csv.reader(lines[pos:], strict=True)
        consumed = 0  # lines of lines[pos:] taken by complete records so far
        try:
            for fields in reader:
                n = pos + reader.line_num  # 1-based physical line where the record ends
                consumed = reader.line_num
                if not fields:
                    continue  # blank line
                if len(fields) > len(fieldnames):
                    yield n, None, f"{len(fields)} fields, header has {len(fieldnames)}"
                elif len(fields) < len(fieldnames):
                    yield (n, None, f"fewer fields ({len(fields)}) than the {len(fieldnames)} of the header")
                else:
                    yield n, dict(zip(fieldnames, fields)), None
            return
        except csv.Error as e:
            bad = pos + consumed  # index of the broken record's first line
            yield bad + 1, None, f"malformed CSV record starting here: {e}"
            pos = bad + 1


def normalise_row(row: dict, base_dir: str) -> tuple[dict | None, str | None]:
    """Validate one raw row; return (catalog row, None) or (None, reason)."""
    item_id, uri = row.get("item_id"), row.get("image_uri")
    for name, value in (("item_id", item_id), ("image_uri", uri)):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None, f"{name} is missing or empty"
    extra = {str(k): str(v) for k, v in row.items() if k not in REQUIRED_CATALOG_COLUMNS and v is not None}
    return {
        "item_id": str(item_id).strip(),
        "image_uri": rio.resolve(str(uri).strip(), base_dir),
        "catalog": extra,
    }, None


def item_partition(item_id: str, partitions: int) -> int:
    """Stable partition of an item id (crc32: cheap, and the same in every process)."""
    return zlib.crc32(item_id.encode()) % partitions


class _ParseCatalogFn(beam.DoFn):
    """Catalog path -> rows, or with ``partitions`` ``(partition, [rows])`` lists of up to ``flush_rows`` rows."""

    def __init__(self, run_id: str, partitions: int = 0, flush_rows: int = FLUSH_ROWS) -> None:
        self.run_id = run_id
        self.partitions, self.flush_rows = partitions, flush_rows
        self.rows = Metrics.counter("read_catalog", "rows")
        self.bad = Metrics.counter("read_catalog", "bad_rows")

    def process(self, path: str):
        buffers: dict[int, list[dict]] = defaultdict(list)
        for row in self._rows(path):
            if not self.partitions or isinstance(row, beam.pvalue.TaggedOutput):
                yield row
                continue
            part = item_partition(row["item_id"], self.partitions)
            buffers[part].append(row)
            if len(buffers[part]) >= self.flush_rows:
                yield part, buffers.pop(part)
        yield from buffers.items()

    def _rows(self, path: str):
        base_dir = rio.dirname(path)
        for n, raw, error in iter_raw_rows(path):
            if raw is not None:
                row, error = normalise_row(raw, base_dir)
            if error is not None:
                self.bad.inc()
                kind = "malformed_row" if raw is None else "missing_field"
                item_id = (raw or {}).get("item_id")  # may be a number in JSONL/Parquet; the table wants a string
                yield tagged_dead_letter(
                    "read_catalog",
                    kind,
                    f"line {n}: {error}",
                    run_id=self.run_id,
                    item_id=None if item_id is None else str(item_id),
                    row=raw,
                )
                continue
            self.rows.inc()
            yield {**row, "row_number": n}


def keep_first(item_id: str, rows, run_id: str) -> tuple[dict, list[beam.pvalue.TaggedOutput]]:
    """The catalog's rule for a repeated item id: the first row (by line) is kept, every later one is a
    ``duplicate_item_id`` dead letter. Returns (kept row, dead letters)."""
    rows = sorted(rows, key=lambda r: r["row_number"])
    return rows[0], [
        tagged_dead_letter(
            "read_catalog",
            "duplicate_item_id",
            f"item_id {item_id!r} on line {dup['row_number']} repeats line {rows[0]['row_number']}; first kept",
            run_id=run_id,
            item_id=item_id,
            image_uri=dup["image_uri"],
            row=dup,
        )
        for dup in rows[1:]
    ]


def duplicates_counter():
    return Metrics.counter("read_catalog", "duplicate_item_ids")


class _DropDuplicatesFn(beam.DoFn):
    """One partition's row lists -> each item id's first row, and a dead letter for every later one."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.duplicates = duplicates_counter()

    def process(self, keyed):
        _partition, lists = keyed
        by_id: dict[str, list[dict]] = defaultdict(list)
        for rows in lists:
            for row in rows:
                by_id[row["item_id"]].append(row)
        for item_id, rows in by_id.items():
            row, dead = keep_first(item_id, rows, self.run_id)
            self.duplicates.inc(len(dead))
            yield row
            yield from dead


class ReadCatalog(beam.PTransform):
    """Catalog path -> (rows, dead letters). Rows leave the parsing worker by the de-duplication shuffle: they
    go to ``partitions`` partitions by item id, in lists (``FLUSH_ROWS``).

    With ``dedupe=False`` repeated item ids are left in, for a caller that groups by item id anyway
    and applies ``keep_first`` there (an incremental run's join), saving a shuffle of the catalog.
    """

    def __init__(
        self,
        path: str,
        run_id: str,
        dedupe: bool = True,
        partitions: int = DEDUPE_PARTITIONS,
        flush_rows: int = FLUSH_ROWS,
    ) -> None:
        super().__init__()
        if partitions < 1 or flush_rows < 1:
            raise ValueError(f"partitions and flush_rows must be >= 1, got {partitions} and {flush_rows}")
        self.path = path
        self.run_id = run_id
        self.dedupe = dedupe
        self.partitions, self.flush_rows = partitions, flush_rows

    def expand(self, pbegin):
        parse = _ParseCatalogFn(self.run_id, self.partitions if self.dedupe else 0, self.flush_rows)
        parsed = (
            pbegin
            | "CatalogPath" >> beam.Create([self.path], reshuffle=False)
            | "Parse" >> beam.ParDo(parse).with_outputs(DEAD_LETTER_TAG, main="rows")
        )
        if not self.dedupe:
            return parsed.rows, parsed[DEAD_LETTER_TAG]
        deduped = (
            parsed.rows
            | "GroupByPartition" >> beam.GroupByKey()
            | "DropDuplicates" >> beam.ParDo(_DropDuplicatesFn(self.run_id)).with_outputs(DEAD_LETTER_TAG, main="rows")
        )
        dead = (parsed[DEAD_LETTER_TAG], deduped[DEAD_LETTER_TAG]) | "FlattenDeadLetters" >> beam.Flatten()
        return deduped.rows, dead
