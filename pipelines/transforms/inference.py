"""RunInference with a model bundle: (metadata, pixels) -> feature rows.

``BundleModelHandler`` is a Beam ``ModelHandler`` that builds the model from a
bundle directory on the worker (nothing live is pickled into the graph) and
encodes whole batches; ``Embed`` wraps it in ``KeyedModelHandler`` so each
image's metadata rides along as the key, and routes failed batches, and the
single images the bundle's embedding transform cannot serve, to the
dead-letter output instead of failing the run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from pipelines.transforms.dead_letter import dead_letter_row
from retrieval_core.embedding_transform import EmbeddingTransformError
from retrieval_core.encoder import Encoder


class BundleModelHandler(ModelHandler[np.ndarray, PredictionResult, Encoder]):
    """Loads a bundle into an ``Encoder`` and runs it on batches of (H, W, 3) uint8 images.

    Args:
        bundle_dir: the model bundle (local path or URI).
        device: ``cpu`` or ``cuda``; ``cuda`` with no GPU raises at load time, never falls back.
        batch_size: images per batch. Batches are this size exactly (only the last one of a bundle is
            smaller): Beam's adaptive batching would start at 1 and jitter the size to fit a latency model,
            which costs throughput in a batch job and makes a run's batches differ from the next run's.
    """

    def __init__(self, bundle_dir: str, device: str = "cpu", batch_size: int = 64) -> None:
        super().__init__()
        self.bundle_dir = bundle_dir
        self.device = device
        self.batch_size = batch_size

    def load_model(self) -> Encoder:
        return Encoder.from_bundle(self.bundle_dir, self.device)

    def run_inference(
        self, batch: Sequence[np.ndarray], model: Encoder, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        encoded = model.encode(batch, row_errors=True)
        for i in range(len(batch)):
            if i in encoded.errors:  # the bundle's transform cannot serve this image: Embed dead-letters it
                yield PredictionResult(None, {"error": encoded.errors[i]}, model_id=model.config.model_id)
                continue
            yield PredictionResult(
                example=None,  # the pixels are not needed downstream; don't carry them
                inference={
                    "embedding": encoded.embeddings[i],
                    "hash_code": encoded.codes[i].tobytes(),
                    "category": encoded.category[i],
                    "category_score": float(encoded.category_score[i]),
                    "attributes": encoded.attributes[i],
                },
                model_id=model.config.model_id,
            )

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)  # the default pickles the whole batch just to measure it

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "BundleModelHandler"


def to_feature_row(meta: dict, result: PredictionResult, run_id: str, indexed_at: dt.datetime) -> dict:
    """One feature-table row (``schemas.feature_schema``) from decode metadata and a prediction."""
    inf = result.inference
    return {
        "item_id": meta["item_id"],
        "image_uri": meta["image_uri"],
        "content_sha256": meta["content_sha256"],
        "model_id": result.model_id,
        "embedding": np.ascontiguousarray(inf["embedding"], dtype=np.float32),  # pickles far faster than a list
        "hash_code": inf["hash_code"],
        "category": inf["category"],
        "category_score": inf["category_score"],
        "attributes": sorted(inf["attributes"].items()),
        "width": meta["width"],
        "height": meta["height"],
        "catalog": sorted(meta["catalog"].items()),
        "run_id": run_id,
        "indexed_at": indexed_at,
        "source_stamp": meta["source_stamp"],
    }


def _inference_dead_letter(meta: dict, error_type: str, message: str, run_id: str) -> dict:
    return dead_letter_row(
        "inference", error_type, message, run_id=run_id, item_id=meta["item_id"], image_uri=meta["image_uri"]
    )


class _FailedBatchToDeadLetters(beam.DoFn):
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.failed = Metrics.counter("inference", "failed")

    def process(self, failed):
        # Beam's exception handling emits (batch, (exception type, repr(exception), formatted traceback)).
        batch, (error_type, error_repr, _traceback) = failed
        for meta, _pixels in batch:
            self.failed.inc()
            yield _inference_dead_letter(meta, error_type.__name__, error_repr, self.run_id)


class _ToFeatureRow(beam.DoFn):
    """(metadata, prediction) -> a feature row, or a dead-letter row (tag ``dead``) for an image whose
    prediction is an error (``BundleModelHandler.run_inference``: the transform cannot serve it)."""

    def __init__(self, run_id: str, indexed_at: dt.datetime) -> None:
        self.run_id, self.indexed_at = run_id, indexed_at
        self.failed = Metrics.counter("inference", "failed")

    def process(self, element):
        meta, result = element
        error = result.inference.get("error")
        if error is None:
            yield to_feature_row(meta, result, self.run_id, self.indexed_at)
            return
        self.failed.inc()
        row = _inference_dead_letter(meta, EmbeddingTransformError.__name__, error, self.run_id)
        yield beam.pvalue.TaggedOutput("dead", row)


class Embed(beam.PTransform):
    """(metadata, pixels) -> (feature rows, dead letters) with batched RunInference."""

    def __init__(self, bundle_dir: str, device: str, batch_size: int, run_id: str, indexed_at: dt.datetime) -> None:
        super().__init__()
        self.handler = KeyedModelHandler(BundleModelHandler(bundle_dir, device, batch_size))
        self.run_id, self.indexed_at = run_id, indexed_at

    def expand(self, decoded):
        main, other = decoded | "RunInference" >> RunInference(self.handler).with_exception_handling()
        to_row = _ToFeatureRow(self.run_id, self.indexed_at)
        out = main | "ToFeatureRow" >> beam.ParDo(to_row).with_outputs("dead", main="rows")
        to_dead = _FailedBatchToDeadLetters(self.run_id)
        bad_batches = other.failed_inferences | "FailedToDeadLetter" >> beam.ParDo(to_dead)
        return out.rows, (out.dead, bad_batches) | "InferenceDeadLetters" >> beam.Flatten()
