"""BuildIndex: feature rows -> float and binary index shards, inside the Beam graph.

Sample -> train the empty index once -> broadcast it as a side input -> fill
the shards in parallel, each shard written with its id file. Items go to shards
by a hash of their id; inside a shard rows are in item-id order, so the result
does not depend on how the runner split or ordered the work.
"""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from retrieval_core import io as rio
from retrieval_core.index.build import (
    IndexSpec,
    choose_spec,
    fill_binary_shard,
    fill_vector_shard,
    serialize_index,
    sha256_bytes,
    shard_of,
    train_vector_index,
)
from schemas import IDS_SCHEMA


def shard_name(kind: str, shard: int, num_shards: int, ext: str) -> str:
    return f"{kind}/shard-{shard:05d}-of-{num_shards:05d}.{ext}"


def _slim(row: dict) -> tuple[str, str, np.ndarray, bytes]:
    return row["item_id"], row["content_sha256"], np.asarray(row["embedding"], np.float32), row["hash_code"]


def _train(sample: list, count: int, *, dim: int, factory: str | None, nprobe: int | None) -> tuple[IndexSpec, bytes]:
    spec = choose_spec(count, factory, nprobe)
    vectors = np.stack([s[2] for s in sample]) if sample else np.zeros((0, dim), np.float32)
    return spec, train_vector_index(vectors, dim, spec)


class _FillShardFn(beam.DoFn):
    """Fill one shard from its items and the trained empty index; write three files; return their entries."""

    def __init__(self, generation_dir: str, generation_rel: str, num_shards: int, dim: int, hash_bits: int) -> None:
        self.generation_dir = generation_dir
        self.generation_rel = generation_rel
        self.num_shards = num_shards
        self.dim = dim
        self.hash_bits = hash_bits
        self.vectors_added = Metrics.counter("build_index", "vectors_added")

    def process(self, keyed, trained):
        shard, items = keyed
        spec, empty_index = trained
        items = sorted((i for i in items if i is not None), key=lambda t: t[0])
        if items:
            vectors = np.stack([t[2] for t in items])
            codes = np.stack([np.frombuffer(t[3], np.uint8) for t in items])
        else:
            vectors, codes = np.zeros((0, self.dim), np.float32), np.zeros((0, self.hash_bits // 8), np.uint8)
        vec_bytes = serialize_index(fill_vector_shard(empty_index, vectors, spec.nprobe))
        bin_bytes = serialize_index(fill_binary_shard(codes, self.hash_bits, spec.binary_factory))
        ids = pa.table({"faiss_id": pa.array(range(len(items)), pa.int64()),
                        "item_id": pa.array([t[0] for t in items], pa.string()),
                        "content_sha256": pa.array([t[1] for t in items], pa.string())}, schema=IDS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(ids, buf, compression="zstd")
        entries = {}
        for kind, ext, data in (("vectors", "faiss", vec_bytes), ("hamming", "faiss", bin_bytes),
                                ("ids", "parquet", buf.getvalue())):
            name = shard_name(kind, shard, self.num_shards, ext)
            rio.write_bytes_atomic(rio.join(self.generation_dir, name), data)
            entries[kind] = {"path": f"{self.generation_rel}/{name}", "sha256": sha256_bytes(data),
                             "bytes": len(data), "rows": len(items)}
        self.vectors_added.inc(len(items))
        yield {"shard": shard, **entries}


class BuildIndex(beam.PTransform):
    """Feature rows -> (per-shard file entries, the IndexSpec used) written under ``generation_dir``.

    Args:
        generation_dir: ``<output>/indices/<generation>`` (local or URI).
        generation_rel: the same, relative to the output root (for the manifest).
        num_shards: number of shards of each index.
        dim, hash_bits: embedding size and code length.
        factory, nprobe: force a faiss factory string / nprobe; default chosen from the row count.
        train_sample_size: vectors sampled to train the quantiser.
    """

    def __init__(self, generation_dir: str, generation_rel: str, *, num_shards: int, dim: int, hash_bits: int,
                 factory: str | None = None, nprobe: int | None = None, train_sample_size: int = 65536) -> None:
        super().__init__()
        self.generation_dir, self.generation_rel = generation_dir, generation_rel
        self.num_shards, self.dim, self.hash_bits = num_shards, dim, hash_bits
        self.factory, self.nprobe, self.train_sample_size = factory, nprobe, train_sample_size

    def expand(self, rows):
        n = self.num_shards
        slim = rows | "Slim" >> beam.Map(_slim)
        count = slim | "Count" >> beam.combiners.Count.Globally()
        trained = (
            slim
            | "Sample" >> beam.combiners.Sample.FixedSizeGlobally(self.train_sample_size)
            | "Train" >> beam.Map(_train, count=beam.pvalue.AsSingleton(count), dim=self.dim, factory=self.factory,
                                  nprobe=self.nprobe)
        )
        # Every shard exists even when no item hashes to it, so the manifest always lists num_shards shards.
        placeholders = slim.pipeline | "AllShards" >> beam.Create([(s, None) for s in range(n)])
        keyed = slim | "KeyByShard" >> beam.Map(lambda t: (shard_of(t[0], n), t))
        shards = (
            (keyed, placeholders)
            | "WithAllShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "FillShards" >> beam.ParDo(_FillShardFn(self.generation_dir, self.generation_rel, n, self.dim,
                                                      self.hash_bits),
                                         trained=beam.pvalue.AsSingleton(trained))
        )
        spec = trained | "Spec" >> beam.Map(lambda t: t[0])
        return shards, spec
