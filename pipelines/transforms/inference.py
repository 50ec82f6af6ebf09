"""RunInference with a model bundle: batches of (metadata, pixels) -> feature record batches.

``BundleModelHandler`` is a Beam ``ModelHandler`` that builds the model from a bundle directory on the worker
(nothing live is pickled into the graph). Its example is a whole batch, ``(metas, pixels)`` as ``ReadAndDecode``
cut it, and its prediction carries the batch's metadata along (as ``KeyedModelHandler`` would, without pickling
every key to count bytes for a metric). ``Embed`` turns each encoded batch into one Arrow record batch of feature
rows (column-wise, straight from the encoder's arrays), and routes the images of a batch the model could not run,
and the single images the bundle's embedding transform cannot serve, to the dead-letter output instead of failing
the run. Failures of the machine (out of memory, CUDA errors: ``is_device_failure``) are not the batch's fault:
they fail the bundle, which the runner retries, and a run that cannot get past them publishes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from pipelines.transforms.dead_letter import DEAD_LETTER_TAG, dead_letter_row
from retrieval_core.embedding_transform import EmbeddingTransformError
from retrieval_core.encoder import EncodedBatch, Encoder, is_device_failure

Batch = tuple[list[dict], list[np.ndarray]]  # (metas, pixels): metas[i] describes the (H, W, 3) uint8 pixels[i]


@dataclass(frozen=True)
class FailedBatch:
    """A prediction's ``inference`` when the model raised on the batch: every image of it becomes a dead letter."""

    error_type: str
    message: str


class BundleModelHandler(ModelHandler[Batch, PredictionResult, Encoder]):
    """Loads a bundle into an ``Encoder`` and encodes batches of images.

    An example is one whole batch, so RunInference is told to pass exactly one example per call
    (``batch_elements_kwargs``). Each result's ``example`` is the batch's ``metas`` (the pixels are not needed
    downstream) and its ``inference`` the batch's ``EncodedBatch``, where an image the bundle's transform cannot
    serve is in ``errors`` (``Encoder.encode(row_errors=True)``), or a ``FailedBatch`` if the model raised on it.
    A failure of the machine (``is_device_failure``) is raised, not turned into a ``FailedBatch``.

    Args:
        bundle_dir: the model bundle (local path or URI).
        device: ``cpu`` or ``cuda``; ``cuda`` with no GPU raises at load time, never falls back.
    """

    def __init__(self, bundle_dir: str, device: str = "cpu") -> None:
        super().__init__()
        self.bundle_dir = bundle_dir
        self.device = device

    def load_model(self) -> Encoder:
        return Encoder.from_bundle(self.bundle_dir, self.device)

    def run_inference(
        self, batch: Sequence[Batch], model: Encoder, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        for metas, pixels in batch:
            try:
                encoded = model.encode(pixels, row_errors=True)
            except Exception as exc:
                if is_device_failure(exc):
                    raise
                encoded = FailedBatch(type(exc).__name__, repr(exc))
            yield PredictionResult(metas, encoded, model_id=model.config.model_id)

    def get_num_bytes(self, batch: Sequence[Batch]) -> int:
        return sum(x.nbytes for _metas, pixels in batch for x in pixels)  # the default pickles the whole batch

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": 1, "max_batch_size": 1}  # an example is already a batch

    def get_metrics_namespace(self) -> str:
        return "BundleModelHandler"


def feature_batch(
    metas: Sequence[dict],
    encoded: EncodedBatch,
    model_id: str,
    run_id: str,
    indexed_at: dt.datetime,
    schema: pa.Schema,
    rows: Sequence[int] | None = None,
) -> pa.RecordBatch:
    """``schemas.feature_schema`` rows, built column-wise: ``metas[i]`` (from ``ReadAndDecode``) with row ``i`` of
    ``encoded``, for each ``i`` in ``rows`` (default: all)."""
    idx = np.arange(len(metas)) if rows is None else np.asarray(rows, dtype=np.int64)
    metas = [metas[i] for i in idx]
    n, dim = len(metas), encoded.embeddings.shape[1]
    embeddings = np.ascontiguousarray(encoded.embeddings[idx], dtype=np.float32)
    return pa.RecordBatch.from_pydict(
        {
            "item_id": [m["item_id"] for m in metas],
            "image_uri": [m["image_uri"] for m in metas],
            "content_sha256": [m["content_sha256"] for m in metas],
            "model_id": [model_id] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
            "hash_code": [encoded.codes[i].tobytes() for i in idx],
            "category": [encoded.category[i] for i in idx],
            "category_score": encoded.category_score[idx],
            "attributes": [sorted(encoded.attributes[i].items()) for i in idx],
            "width": [m["width"] for m in metas],
            "height": [m["height"] for m in metas],
            "catalog": [sorted(m["catalog"].items()) for m in metas],
            "run_id": [run_id] * n,
            "indexed_at": [indexed_at] * n,
            "source_stamp": [m["source_stamp"] for m in metas],
        },
        schema=schema,
    )


def _inference_dead_letter(meta: dict, error_type: str, message: str, run_id: str) -> dict:
    return dead_letter_row(
        "inference", error_type, message, run_id=run_id, item_id=meta["item_id"], image_uri=meta["image_uri"]
    )


class _ToFeatureBatch(beam.DoFn):
    """A batch's prediction -> one record batch of feature rows, and a dead-letter row (tag ``dead_letter``)
    for each image the bundle's transform cannot serve (``EncodedBatch.errors``), or for every image of a
    ``FailedBatch``."""

    def __init__(self, run_id: str, indexed_at: dt.datetime, schema: pa.Schema) -> None:
        self.run_id, self.indexed_at, self.schema = run_id, indexed_at, schema
        self.images = Metrics.counter("inference", "images")
        self.failed = Metrics.counter("inference", "failed")

    def process(self, result: PredictionResult):
        metas = result.example
        encoded: EncodedBatch | FailedBatch = result.inference
        if isinstance(encoded, FailedBatch):
            self.failed.inc(len(metas))
            for meta in metas:
                row = _inference_dead_letter(meta, encoded.error_type, encoded.message, self.run_id)
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, row)
            return
        self.images.inc(len(metas))
        for i, error in sorted(encoded.errors.items()):
            self.failed.inc()
            row = _inference_dead_letter(metas[i], EmbeddingTransformError.__name__, error, self.run_id)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, row)
        ok = [i for i in range(len(metas)) if i not in encoded.errors]
        if ok:
            rows = None if len(ok) == len(metas) else ok
            yield feature_batch(metas, encoded, result.model_id, self.run_id, self.indexed_at, self.schema, rows)


class Embed(beam.PTransform):
    """(metas, pixels) batches -> (feature record batches, dead letters) with RunInference."""

    def __init__(self, bundle_dir: str, device: str, run_id: str, indexed_at: dt.datetime, schema: pa.Schema) -> None:
        super().__init__()
        self.handler = BundleModelHandler(bundle_dir, device)
        self.run_id, self.indexed_at, self.schema = run_id, indexed_at, schema

    def expand(self, batches):
        to_rows = _ToFeatureBatch(self.run_id, self.indexed_at, self.schema)
        out = (
            batches
            | "RunInference" >> RunInference(self.handler)
            | "ToFeatureBatch" >> beam.ParDo(to_rows).with_outputs(DEAD_LETTER_TAG, main="rows")
        )
        return out.rows, out[DEAD_LETTER_TAG]
