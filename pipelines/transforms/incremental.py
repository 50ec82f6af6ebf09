"""SkipUnchanged: the incremental part of a nightly run.

Catalog rows are joined on ``item_id`` with the feature rows of the published
generation. An image whose bytes hash to the stored ``content_sha256`` (and
whose stored row came from the same model) is *unchanged*: its feature row is
carried over without decoding or embedding. Everything else is *new* or
*changed* and goes on to ReadAndDecode. Items of the previous generation that
are no longer in the catalog are *removed*: they are simply not carried.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines.transforms.dead_letter import DEAD_LETTER_TAG
from pipelines.transforms.decode import read_failure
from pipelines.transforms.timing import StageTimer
from retrieval_core import io as rio

CARRIED_TAG = "carried"


class _HashContentFn(beam.DoFn):
    """Read an image and hash its bytes (no decoding): the cheap test of whether it changed."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.read_failed = Metrics.counter("read_and_decode", "read_failed")
        self.timer = StageTimer("incremental", "read_and_hash")

    def process(self, row: dict):
        try:
            with self.timer.time():
                digest = hashlib.sha256(rio.read_bytes(row["image_uri"])).hexdigest()
        except Exception as e:  # this row's problem only
            self.read_failed.inc()
            yield read_failure(row, e, self.run_id)
            return
        yield row["item_id"], {**row, "content_sha256": digest}


class _ClassifyFn(beam.DoFn):
    """Per item: carry the previous row, send the catalog row to decoding, or count a removal."""

    def __init__(self, model_id: str, run_id: str) -> None:
        self.model_id, self.run_id = model_id, run_id
        self.counters = {k: Metrics.counter("incremental", k) for k in ("new", "changed", "unchanged", "removed")}

    def process(self, joined):
        _, groups = joined
        current, previous = list(groups["current"]), list(groups["previous"])
        if not current:
            self.counters["removed"].inc()
            return
        row = current[0]  # ReadCatalog already dropped duplicate item ids
        prev = previous[0] if previous else None
        if prev is not None and prev["content_sha256"] == row["content_sha256"] and prev["model_id"] == self.model_id:
            self.counters["unchanged"].inc()
            carried = {
                **prev,
                "embedding": np.asarray(prev["embedding"], dtype=np.float32),
                "image_uri": row["image_uri"],
                "catalog": sorted(row["catalog"].items()),
                "run_id": self.run_id,
            }
            yield beam.pvalue.TaggedOutput(CARRIED_TAG, carried)
            return
        self.counters["changed" if prev is not None else "new"].inc()
        yield row


class SkipUnchanged(beam.PTransform):
    """Catalog rows -> (rows to decode, carried feature rows, dead letters).

    Args:
        previous_feature_files: the feature files of the published generation (empty for a full run).
        model_id: the bundle of this run; rows made by another model are never carried.
        run_id: this run.
    """

    def __init__(self, previous_feature_files: list[str], model_id: str, run_id: str) -> None:
        super().__init__()
        self.previous_files, self.model_id, self.run_id = list(previous_feature_files), model_id, run_id

    def expand(self, rows):
        hashed = rows | "HashContent" >> beam.ParDo(_HashContentFn(self.run_id)).with_outputs(
            DEAD_LETTER_TAG, main="hashed"
        )
        previous = (
            rows.pipeline
            | "PreviousFiles" >> beam.Create(self.previous_files)
            | "ReadPrevious" >> beam.io.ReadAllFromParquet()
            | "KeyPrevious" >> beam.Map(lambda r: (r["item_id"], r))
        )
        classified = (
            {"current": hashed.hashed, "previous": previous}
            | "JoinOnItemId" >> beam.CoGroupByKey()
            | "Classify" >> beam.ParDo(_ClassifyFn(self.model_id, self.run_id)).with_outputs(CARRIED_TAG, main="todo")
        )
        return classified.todo, classified[CARRIED_TAG], hashed[DEAD_LETTER_TAG]
