"""ReadAndDecode: catalog rows -> batches of (metadata, model-ready pixels), and a dead-letter row for each
image that could not be read or decoded.

The rows are cut into batches of the inference batch size *before* reading, and everything after this point
(inference, feature rows, Parquet) handles a batch as one element: per image, the only Python left is the read,
the hash and the decode. Beam's per-element work (microseconds for each DoFn an element passes through) is paid
once per batch, not once per image.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines.transforms.dead_letter import DEAD_LETTER_TAG, tagged_dead_letter
from pipelines.transforms.timing import StageTimer
from retrieval_core import io as rio
from retrieval_core.preprocess import DecodeError, DecodeLimits, Preprocessing, decode_image


def read_error_type(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "not_found"
    if isinstance(e, PermissionError):
        return "permission_denied"
    if isinstance(e, IsADirectoryError):
        return "is_a_directory"
    return type(e).__name__


def read_error(e: Exception) -> tuple[str, str]:
    """(error type, message) of a failed image read, as the dead-letter table records them."""
    return read_error_type(e), f"{type(e).__name__}: {e}"


def read_failure(row: dict, error: tuple[str, str], run_id: str) -> beam.pvalue.TaggedOutput:
    """The dead-letter output for a catalog row whose image could not be read (``error`` from ``read_error``)."""
    return tagged_dead_letter(
        "read", *error, run_id=run_id, item_id=row["item_id"], image_uri=row["image_uri"], row=row
    )


T = TypeVar("T")
R = TypeVar("R")

REMOTE_READ_THREADS = 16
"""Remote images (GCS, http) of a batch read at once: their reads wait on the network, not the CPU."""


def map_reads(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], rows: Iterable[T], uri: Callable[[T], str]
) -> Iterator[R]:
    """``fn`` over ``rows``: the ones whose ``uri`` is local inline (a thread would cost more than the read), the
    remote ones through ``pool`` all at once (their reads wait on the network). Local results come first."""
    local: list[T] = []
    remote: list[T] = []
    for row in rows:
        (local if rio.is_local(uri(row)) else remote).append(row)
    return itertools.chain(map(fn, local), pool.map(fn, remote))


def _read(row: dict) -> tuple[dict, bytes | None, str | None, tuple[str, str] | None, int]:
    """(row, data, source stamp, read error, microseconds) of reading ``row``'s image; never raises."""
    start = time.perf_counter_ns()
    try:
        data, stamp = rio.read_bytes_stamped(row["image_uri"])
        error = None
    except Exception as e:  # any read failure is this row's problem only
        data, stamp, error = None, None, read_error(e)
    return row, data, stamp, error, (time.perf_counter_ns() - start) // 1000


class _ReadAndDecodeFn(beam.DoFn):
    def __init__(self, prep: Preprocessing, limits: DecodeLimits, run_id: str, threads: int) -> None:
        self.prep = prep
        self.limits = limits
        self.run_id = run_id
        self.threads = threads
        self.pool: ThreadPoolExecutor | None = None
        self.read_failed = Metrics.counter("read_and_decode", "read_failed")
        self.decode_failed = Metrics.counter("read_and_decode", "decode_failed")
        self.decoded = Metrics.counter("read_and_decode", "decoded")
        self.bytes_read = Metrics.counter("read_and_decode", "bytes_read")
        self.read_timer = StageTimer("read_and_decode", "read")
        self.decode_timer = StageTimer("read_and_decode", "decode")

    def setup(self) -> None:
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="read")

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def process(self, rows: list[dict]):
        metas: list[dict] = []
        pixels: list[np.ndarray] = []
        nbytes = 0
        # The batch's remote images are all requested at once, and each is decoded as it comes back.
        for row, data, stamp, error, micros in map_reads(self.pool, _read, rows, lambda r: r["image_uri"]):
            self.read_timer.record(micros)
            if error is not None:
                self.read_failed.inc()
                yield read_failure(row, error, self.run_id)
                continue
            nbytes += len(data)
            start = time.perf_counter_ns()  # not StageTimer.time(): a context manager costs microseconds per image
            try:
                decoded = decode_image(data, self.prep, self.limits)
            except DecodeError as e:
                self.decode_failed.inc()
                yield tagged_dead_letter(
                    "decode",
                    e.error_type,
                    str(e),
                    run_id=self.run_id,
                    item_id=row["item_id"],
                    image_uri=row["image_uri"],
                    row=row,
                )
                continue
            finally:
                self.decode_timer.record((time.perf_counter_ns() - start) // 1000)
            metas.append(
                {
                    "item_id": row["item_id"],
                    "image_uri": row["image_uri"],
                    "content_sha256": hashlib.sha256(data).hexdigest(),
                    "source_stamp": stamp,  # of the very bytes hashed here, so the next run may trust it
                    "width": decoded.width,
                    "height": decoded.height,
                    "catalog": row["catalog"],
                }
            )
            pixels.append(decoded.pixels)
        self.bytes_read.inc(nbytes)
        self.decoded.inc(len(metas))
        if metas:
            yield metas, pixels


class ReadAndDecode(beam.PTransform):
    """Catalog rows -> (batches, dead letters). A batch is ``(metas, pixels)``: ``metas[i]`` (item id, URI,
    content hash, source stamp, size, catalog columns) describes ``pixels[i]``, an (H, W, 3) uint8 image.

    A batch holds the rows of one chunk that could be read and decoded, so a chunk with bad images gives a
    smaller batch; chunks are cut within a runner's bundle, so a bundle's last one may be smaller too.
    """

    def __init__(
        self,
        prep: Preprocessing,
        run_id: str,
        batch_size: int,
        limits: DecodeLimits | None = None,
        remote_threads: int = REMOTE_READ_THREADS,
    ) -> None:
        super().__init__()
        if batch_size < 1 or remote_threads < 1:
            raise ValueError(f"batch_size and remote_threads must be >= 1, got {batch_size} and {remote_threads}")
        self.prep, self.limits, self.run_id, self.batch_size = prep, limits or DecodeLimits(), run_id, batch_size
        self.remote_threads = remote_threads

    def expand(self, rows):
        # Exactly batch_size rows per chunk (fewer only at a bundle's end): Beam's adaptive batching would start
        # at one and jitter the size to fit a latency model, which costs throughput in a batch job.
        chunks = (
            rows
            | "Chunk" >> beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size)
            # Whatever grouped the rows before (the catalog's 1,024 de-duplication partitions, the incremental
            # join's partitions) must not bound how many workers decode and embed: each chunk goes on its own.
            | "SpreadChunks" >> beam.Reshuffle()
        )
        out = chunks | "ReadDecode" >> beam.ParDo(
            _ReadAndDecodeFn(self.prep, self.limits, self.run_id, self.remote_threads)
        ).with_outputs(DEAD_LETTER_TAG, main="decoded")
        return out.decoded, out[DEAD_LETTER_TAG]
