"""BuildIndex: feature rows -> float and binary index shards, inside the Beam graph.

Sample -> train the empty index once -> broadcast it as a side input -> fill
the shards in parallel, each shard written with its id file. Items go to shards
by a hash of their id; inside a shard rows are in item-id order, so the result
does not depend on how the runner split or ordered the work.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines.transforms.timing import StageTimer
from retrieval_core.index.build import IndexSpec, choose_spec, shard_of, train_vector_index, write_shard


def _slim(row: dict) -> tuple[str, str, np.ndarray, bytes]:
    return row["item_id"], row["content_sha256"], np.asarray(row["embedding"], np.float32), row["hash_code"]


def _train(sample: list, count: int, *, dim: int, factory: str | None, nprobe: int | None) -> tuple[IndexSpec, bytes]:
    spec = choose_spec(count, factory, nprobe)
    vectors = np.stack([s[2] for s in sample]) if sample else np.zeros((0, dim), np.float32)
    return spec, train_vector_index(vectors, dim, spec)


class _FillShardFn(beam.DoFn):
    """Fill one shard from its items and the trained empty index (a side input); write its three files."""

    def __init__(self, generation_dir: str, generation_rel: str, num_shards: int, dim: int, hash_bits: int) -> None:
        self.generation_dir = generation_dir
        self.generation_rel = generation_rel
        self.num_shards = num_shards
        self.dim = dim
        self.hash_bits = hash_bits
        self.vectors_added = Metrics.counter("build_index", "vectors_added")
        self.timer = StageTimer("build_index", "fill_and_write_shard")

    def process(self, keyed, trained):
        shard, items = keyed
        spec, empty_index = trained
        items = [i for i in items if i is not None]
        with self.timer.time():
            result = write_shard(
                self.generation_dir,
                self.generation_rel,
                shard,
                self.num_shards,
                items,
                spec,
                empty_index,
                self.dim,
                self.hash_bits,
            )
        self.vectors_added.inc(len(items))
        yield result


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

    def __init__(
        self,
        generation_dir: str,
        generation_rel: str,
        *,
        num_shards: int,
        dim: int,
        hash_bits: int,
        factory: str | None = None,
        nprobe: int | None = None,
        train_sample_size: int = 65536,
    ) -> None:
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
            | "Train"
            >> beam.Map(
                _train, count=beam.pvalue.AsSingleton(count), dim=self.dim, factory=self.factory, nprobe=self.nprobe
            )
        )
        # Every shard exists even when no item hashes to it, so the manifest always lists num_shards shards.
        shard_keys = slim.pipeline | "AllShards" >> beam.Create([(s, None) for s in range(n)])
        keyed = slim | "KeyByShard" >> beam.Map(lambda t: (shard_of(t[0], n), t))
        shards = (
            (keyed, shard_keys)
            | "WithAllShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "FillShards"
            >> beam.ParDo(
                _FillShardFn(self.generation_dir, self.generation_rel, n, self.dim, self.hash_bits),
                trained=beam.pvalue.AsSingleton(trained),
            )
        )
        spec = trained | "Spec" >> beam.Map(lambda t: t[0])
        return shards, spec
