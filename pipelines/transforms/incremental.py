"""SkipUnchanged: the incremental part of a nightly run.

Catalog rows are joined on ``item_id`` with the keys (item id, content hash,
model id, source stamp) of the published generation's feature rows. An image
whose bytes hash to the stored ``content_sha256`` (and whose stored row came from
the same model) is *unchanged*: its feature row is carried over without decoding
or embedding. Everything else is *new* or *changed* and goes on to ReadAndDecode.
Items of the previous generation that are no longer in the catalog are
*removed*: they are simply not carried.

Most images are not even read: when the stored ``source_stamp`` (size, mtime,
ctime and inode of a local file; the generation of a GCS object) equals the
image's stamp now, the stored hash still holds, as ``git status`` trusts its
index. One ``stat`` (or one GCS metadata request) replaces reading and hashing
the image. Stamps are only recorded when they can be trusted (see
``retrieval_core.io.read_bytes_stamped``); ``--rehash`` ignores them.

Carrying is column-wise: only the small keys take part in the join; each
previous feature file is then read once as an Arrow table, the carried rows are
taken from it with their catalog columns updated, and written as one Parquet
file of this run. No embedding becomes a Python object on the way.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipelines.transforms.catalog import duplicates_counter, item_partition, keep_first
from pipelines.transforms.dead_letter import DEAD_LETTER_TAG
from pipelines.transforms.decode import REMOTE_READ_THREADS, map_reads, read_error, read_failure
from pipelines.transforms.timing import StageTimer
from retrieval_core import io as rio
from schemas import STRING_MAP

CARRIED_TAG = "carried"
_KEY_COLUMNS = ["item_id", "content_sha256", "model_id", "source_stamp"]


class _Fingerprint(NamedTuple):
    row: dict
    digest: str | None  # sha256 of the image bytes; None when the read failed
    stamp: str | None  # source stamp of the version hashed (or checked)
    error: tuple[str, str] | None  # read_error of a failed read
    read: bool  # False: the stored hash was trusted because the stamp was unchanged
    micros: int


def _fingerprint(row: dict, stored: tuple[str, str] | None) -> _Fingerprint:
    """The content hash of ``row``'s image. ``stored`` (sha256, stamp) is trusted, without reading the image,
    when the image's stamp is still ``stamp``; otherwise the image is read and hashed."""
    start = time.perf_counter_ns()
    try:
        uri = row["image_uri"]
        if stored is not None and rio.source_stamp(uri) == stored[1]:
            return _Fingerprint(row, stored[0], stored[1], None, False, (time.perf_counter_ns() - start) // 1000)
        data, stamp = rio.read_bytes_stamped(uri)
        digest, error = hashlib.sha256(data).hexdigest(), None
    except Exception as e:  # this row's problem only
        digest, stamp, error = None, None, read_error(e)
    return _Fingerprint(row, digest, stamp, error, True, (time.perf_counter_ns() - start) // 1000)


_CURRENT, _PREVIOUS = 0, 1  # the two sides of the join

ROWS_PER_PARTITION = 20_000
"""Items per join partition. One DoFn call holds a partition's catalog rows and previous keys in memory."""


def join_partitions(previous_rows: int) -> int:
    """How many partitions the join uses for a previous generation of ``previous_rows`` items.

    Sized from the previous generation (known when the graph is built): a catalog that grew many times
    over since then gets larger partitions for one run; the next run is sized from this one.
    """
    return min(max(1, math.ceil(previous_rows / ROWS_PER_PARTITION)), 65_536)


class _PartitionRowsFn(beam.DoFn):
    """A batch of catalog rows -> ``(partition, (_CURRENT, rows))`` for each partition present in the batch."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def process(self, batch: list[dict]):
        parts = defaultdict(list)
        for row in batch:
            parts[item_partition(row["item_id"], self.partitions)].append(row)
        for part, rows in parts.items():
            yield part, (_CURRENT, rows)


class _PreviousKeysFn(beam.DoFn):
    """A previous feature file -> ``(partition, (_PREVIOUS, (file, [(item_id, content_sha256, model_id, stamp)])))``.

    Files of schema 1.0 have no ``source_stamp`` column: their stamps are None (their images are hashed).
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def process(self, path: str):
        table = rio.read_parquet(path, columns=_KEY_COLUMNS, missing_ok=True)
        columns = [table[c].to_pylist() if c in table.column_names else [None] * len(table) for c in _KEY_COLUMNS]
        parts = defaultdict(list)
        for keys in zip(*columns, strict=True):
            parts[item_partition(keys[0], self.partitions)].append(keys)
        for part, keys in parts.items():
            yield part, (_PREVIOUS, (path, keys))


class _ClassifyFn(beam.DoFn):
    """One join partition: drop repeated catalog rows, fingerprint the images, then carry, re-embed or count removals.

    This is a partitioned hash join: catalog rows and previous keys meet by partition of the item id,
    so what is shuffled is a few lists per partition, never one record per item. Catalog rows arrive
    un-deduplicated (the join groups by item id anyway) and ``keep_first`` applies the rule ReadCatalog
    applies on a full run. Fingerprinting (a stamp check, else a read and a hash) happens after the
    shuffle, so it is spread over workers. Remote images (GCS, http) are fingerprinted ``threads`` at a
    time, because such a request is mostly waiting; local files inline, because for small files a pool
    only adds GIL hand-offs (5x slower, measured on 10,000 5 KB files). ``rehash``: never trust a stamp.

    Outputs: rows to decode (main); ``(previous file, [(item_id, image_uri, catalog items, stamp)])`` for
    the carried items (``CARRIED_TAG``); dead letters.
    """

    def __init__(self, model_id: str, run_id: str, rehash: bool = False, threads: int = REMOTE_READ_THREADS) -> None:
        self.model_id, self.run_id, self.rehash, self.threads = model_id, run_id, rehash, threads
        self.read_failed = Metrics.counter("read_and_decode", "read_failed")
        self.duplicates = duplicates_counter()
        self.counters = {k: Metrics.counter("incremental", k) for k in ("new", "changed", "unchanged", "removed")}
        self.hashed = Metrics.counter("incremental", "hashed")  # images read and hashed
        self.stamp_hits = Metrics.counter("incremental", "stamp_hits")  # stored hash trusted, image not read
        self.timer = StageTimer("incremental", "fingerprint")

    def setup(self) -> None:
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hash")

    def teardown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def process(self, keyed):
        _, sides = keyed
        current, previous = defaultdict(list), {}
        for side, value in sides:
            if side == _CURRENT:
                for row in value:
                    current[row["item_id"]].append(row)
            else:
                path, keys = value
                previous.update((key[0], (*key[1:], path)) for key in keys)  # item_id -> (sha, model, stamp, file)
        self.counters["removed"].inc(len(previous.keys() - current.keys()))
        jobs = []
        for item_id, rows in current.items():
            row, duplicates = keep_first(item_id, rows, self.run_id)
            self.duplicates.inc(len(duplicates))
            yield from duplicates
            prev = previous.get(item_id)
            trusted = None  # a stored (hash, stamp) worth checking: same model, a stamp, not --rehash
            if prev is not None and prev[1] == self.model_id and prev[2] is not None and not self.rehash:
                trusted = (prev[0], prev[2])
            jobs.append((row, trusted))
        fingerprints = map_reads(self.pool, lambda job: _fingerprint(*job), jobs, lambda job: job[0]["image_uri"])
        carried = defaultdict(list)
        for row, digest, stamp, error, read, micros in fingerprints:
            self.timer.record(micros)
            (self.hashed if read else self.stamp_hits).inc()
            prev = previous.get(row["item_id"])
            if error is not None:
                self.read_failed.inc()
                yield read_failure(row, error, self.run_id)
            elif prev is not None and prev[0] == digest and prev[1] == self.model_id:
                self.counters["unchanged"].inc()
                carried[prev[3]].append((row["item_id"], row["image_uri"], sorted(row["catalog"].items()), stamp))
            else:
                self.counters["changed" if prev is not None else "new"].inc()
                yield {**row, "content_sha256": digest}
        for source, items in carried.items():
            yield beam.pvalue.TaggedOutput(CARRIED_TAG, (source, items))


def carried_file_name(prefix: str, previous_file: str) -> str:
    """``<prefix>-carried-<hash of the source file>.parquet``: the same source gives the same name on a retry."""
    return f"{prefix}-carried-{hashlib.sha256(previous_file.encode()).hexdigest()[:16]}.parquet"


def carry_rows(
    table: pa.Table, carried: list[tuple[str, str, list, str | None]], run_id: str, schema: pa.Schema
) -> pa.Table:
    """The rows of ``table`` named by ``carried`` (item_id, image_uri, catalog items, source stamp), in item-id
    order, with this run's catalog columns, stamps and run id; features, content hash and ``indexed_at`` stay
    as they were. ``table`` may be of an older minor schema version (no ``source_stamp`` column)."""
    carried = sorted(carried)
    position = {item_id: i for i, item_id in enumerate(table.column("item_id").to_pylist())}
    missing = [c[0] for c in carried if c[0] not in position]
    if missing:
        raise ValueError(f"{len(missing)} carried items are not in their source file (first: {missing[0]!r})")
    out = table.take(pa.array([position[c[0]] for c in carried], pa.int64()))
    replace = {
        "image_uri": pa.array([c[1] for c in carried], pa.string()),
        "catalog": pa.array([c[2] for c in carried], STRING_MAP),
        "run_id": pa.array([run_id] * len(carried), pa.string()),
        "source_stamp": pa.array([c[3] for c in carried], pa.string()),
    }
    return pa.Table.from_arrays([replace[f.name] if f.name in replace else out[f.name] for f in schema], schema=schema)


class _WriteCarriedFn(beam.DoFn):
    """(previous file, lists of carried items) -> that file's carried rows, as one Parquet file of this run."""

    def __init__(self, prefix: str, run_id: str, schema: pa.Schema) -> None:
        self.prefix, self.run_id, self.schema = prefix, run_id, schema
        self.timer = StageTimer("incremental", "write_carried")

    def process(self, keyed):
        source, lists = keyed
        with self.timer.time():
            table = carry_rows(rio.read_parquet(source), list(itertools.chain(*lists)), self.run_id, self.schema)
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            path = carried_file_name(self.prefix, source)
            rio.write_bytes_atomic(path, buf.getvalue())
        yield path


class SkipUnchanged(beam.PTransform):
    """Catalog rows, not yet deduplicated -> (rows to decode, carried feature files written, dead letters).

    Args:
        previous_feature_files: the feature files of the published generation (empty for a full run).
        previous_rows: how many rows they hold (sets the number of join partitions).
        model_id: the bundle of this run; rows made by another model are never carried.
        run_id: this run.
        prefix: file prefix of this run's feature table (``table_prefix``); carried files are written beside it.
        schema: the feature schema.
        rehash: read and hash every image, trusting no stored source stamp.
    """

    def __init__(
        self,
        previous_feature_files: list[str],
        previous_rows: int,
        model_id: str,
        run_id: str,
        prefix: str,
        schema: pa.Schema,
        rehash: bool = False,
    ) -> None:
        super().__init__()
        self.rehash = rehash
        self.previous_files, self.model_id, self.run_id = list(previous_feature_files), model_id, run_id
        self.partitions = join_partitions(previous_rows)
        self.prefix, self.schema = prefix, schema

    def expand(self, rows):
        current = (
            rows
            # In-bundle batches (no shuffle), so the join's shuffle moves lists, not one record per row.
            | "Batch"
            >> beam.BatchElements(min_batch_size=max(1, ROWS_PER_PARTITION // 4), max_batch_size=ROWS_PER_PARTITION)
            | "PartitionRows" >> beam.ParDo(_PartitionRowsFn(self.partitions))
        )
        previous = (
            rows.pipeline
            | "PreviousFiles" >> beam.Create(self.previous_files, reshuffle=False)  # reading keys is cheap
            | "ReadPreviousKeys" >> beam.ParDo(_PreviousKeysFn(self.partitions))
        )
        classified = (
            (current, previous)
            | "BothSides" >> beam.Flatten()
            | "JoinByPartition" >> beam.GroupByKey()
            | "Classify"
            >> beam.ParDo(_ClassifyFn(self.model_id, self.run_id, self.rehash)).with_outputs(
                CARRIED_TAG, DEAD_LETTER_TAG, main="todo"
            )
        )
        carried_files = (
            classified[CARRIED_TAG]
            | "GroupBySourceFile" >> beam.GroupByKey()
            | "WriteCarried" >> beam.ParDo(_WriteCarriedFn(self.prefix, self.run_id, self.schema))
        )
        return classified.todo, carried_files, classified[DEAD_LETTER_TAG]
