"""ReadAndDecode: catalog row -> (metadata, model-ready pixels), or a dead-letter row saying why not."""

from __future__ import annotations

import hashlib

import apache_beam as beam
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


class _ReadAndDecodeFn(beam.DoFn):
    def __init__(self, prep: Preprocessing, limits: DecodeLimits, run_id: str) -> None:
        self.prep = prep
        self.limits = limits
        self.run_id = run_id
        self.read_failed = Metrics.counter("read_and_decode", "read_failed")
        self.decode_failed = Metrics.counter("read_and_decode", "decode_failed")
        self.decoded = Metrics.counter("read_and_decode", "decoded")
        self.bytes_read = Metrics.counter("read_and_decode", "bytes_read")
        self.read_timer = StageTimer("read_and_decode", "read")
        self.decode_timer = StageTimer("read_and_decode", "decode")

    def process(self, row: dict):
        uri = row["image_uri"]
        try:
            with self.read_timer.time():
                data, stamp = rio.read_bytes_stamped(uri)
        except Exception as e:  # any read failure is this row's problem only
            self.read_failed.inc()
            yield read_failure(row, read_error(e), self.run_id)
            return
        self.bytes_read.inc(len(data))
        try:
            with self.decode_timer.time():
                decoded = decode_image(data, self.prep, self.limits)
        except DecodeError as e:
            self.decode_failed.inc()
            yield tagged_dead_letter(
                "decode", e.error_type, str(e), run_id=self.run_id, item_id=row["item_id"], image_uri=uri, row=row
            )
            return
        self.decoded.inc()
        meta = {
            "item_id": row["item_id"],
            "image_uri": uri,
            "content_sha256": hashlib.sha256(data).hexdigest(),
            "source_stamp": stamp,  # of the very bytes hashed here, so the next run may trust it
            "width": decoded.width,
            "height": decoded.height,
            "catalog": row["catalog"],
        }
        yield meta, decoded.pixels


class ReadAndDecode(beam.PTransform):
    """Catalog rows -> ((metadata, pixels) elements, dead letters)."""

    def __init__(self, prep: Preprocessing, run_id: str, limits: DecodeLimits | None = None) -> None:
        super().__init__()
        self.prep, self.limits, self.run_id = prep, limits or DecodeLimits(), run_id

    def expand(self, rows):
        out = rows | "ReadDecode" >> beam.ParDo(_ReadAndDecodeFn(self.prep, self.limits, self.run_id)).with_outputs(
            DEAD_LETTER_TAG, main="decoded"
        )
        return out.decoded, out[DEAD_LETTER_TAG]
