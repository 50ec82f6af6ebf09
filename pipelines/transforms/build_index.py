"""BuildIndex: written feature files -> float and binary index shards, inside the Beam graph.

Each feature file is read column-wise (item id, content hash, embedding, code)
and cut into one ``Block`` per shard, so what moves between workers is a few
arrays per file, never one Python object per row. A bottom-k sample by a hash
of the item id trains the empty index once; it is broadcast as a side input and
the shards are filled in parallel, each written with its id file. Items go to
shards by a hash of their id and inside a shard rows are in item-id order, so
the result does not depend on how the runner split or ordered the work.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines.transforms.timing import StageTimer
from retrieval_core.index.build import (
    Block,
    bottom_k,
    choose_spec,
    id_keys,
    read_feature_block,
    train_vector_index,
    write_shard,
)

SAMPLE_TAG = "sample"


class _ReadBlocksFn(beam.DoFn):
    """One feature file -> ``(shard, Block)`` for every shard that has rows in it, and on ``SAMPLE_TAG`` the
    file's ``(row count, sample keys, vectors)`` already cut to its bottom ``sample_size``."""

    def __init__(self, num_shards: int, dim: int, hash_bits: int, sample_size: int) -> None:
        self.num_shards, self.dim, self.hash_bits, self.sample_size = num_shards, dim, hash_bits, sample_size
        self.rows = Metrics.counter("build_index", "rows_read")
        self.timer = StageTimer("build_index", "read_features")

    def process(self, path: str):
        with self.timer.time():
            block = read_feature_block(path, self.dim, self.hash_bits)
            shard_keys, sample_keys = id_keys(block.item_ids)
            parts = block.split_by_shard(self.num_shards, shard_keys)
            sample = bottom_k(sample_keys, block.vectors, self.sample_size)
        self.rows.inc(len(block))
        yield beam.pvalue.TaggedOutput(SAMPLE_TAG, (len(block), *sample))
        yield from parts.items()


class _TrainingSample(beam.CombineFn):
    """Per-file samples -> ``(row count, the sample_size vectors with the smallest sample keys)``.

    Order-independent (see ``bottom_k``): the same rows give the same sample on any runner.
    """

    def __init__(self, sample_size: int, dim: int) -> None:
        self.sample_size, self.dim = sample_size, dim

    def create_accumulator(self):
        return 0, np.zeros(0, np.uint64), np.zeros((0, self.dim), np.float32)

    def _merge(self, parts):
        count = sum(p[0] for p in parts)
        keys, vectors = bottom_k(
            np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]), self.sample_size
        )
        return count, keys, vectors

    def add_input(self, acc, sample):
        return self._merge([acc, sample])

    def merge_accumulators(self, accumulators):
        return self._merge(list(accumulators))

    def extract_output(self, acc):
        count, _, vectors = acc
        return count, vectors


def _train(
    sample: tuple[int, np.ndarray],
    *,
    dim: int,
    hash_bits: int,
    factory: str | None,
    nprobe: int | None,
    binary_factory: str | None,
    max_index_memory: int | None,
):
    count, vectors = sample
    spec = choose_spec(count, factory, nprobe, hash_bits, binary_factory, dim=dim, max_index_memory=max_index_memory)
    return spec, train_vector_index(vectors, dim, spec)


class _FillShardFn(beam.DoFn):
    """Fill one shard from its blocks and the trained empty index (a side input); write its three files."""

    def __init__(self, generation_dir: str, generation_rel: str, num_shards: int, dim: int, hash_bits: int) -> None:
        self.generation_dir = generation_dir
        self.generation_rel = generation_rel
        self.num_shards = num_shards
        self.dim = dim
        self.hash_bits = hash_bits
        self.vectors_added = Metrics.counter("build_index", "vectors_added")
        self.timer = StageTimer("build_index", "fill_and_write_shard")

    def process(self, keyed, trained):
        shard, blocks = keyed
        spec, empty_index = trained
        block = Block.concat((b for b in blocks if b is not None), self.dim, self.hash_bits)
        with self.timer.time():
            result = write_shard(
                self.generation_dir,
                self.generation_rel,
                shard,
                self.num_shards,
                block,
                spec,
                empty_index,
                self.dim,
                self.hash_bits,
            )
        self.vectors_added.inc(len(block))
        yield result


class BuildIndex(beam.PTransform):
    """Feature file paths -> (per-shard file entries, the IndexSpec used) written under ``generation_dir``.

    Args:
        generation_dir: ``<output>/indices/<generation>`` (local or URI).
        generation_rel: the same, relative to the output root (for the manifest).
        num_shards: number of shards of each index.
        dim, hash_bits: embedding size and code length.
        factory, nprobe, binary_factory: force a faiss factory string / nprobe / binary factory string;
            default chosen from the row count (``choose_spec``).
        train_sample_size: vectors sampled to train the quantiser.
        max_index_memory: bytes the vector shards may take in memory together; picks a compressed index
            type when an exact one would not fit (``choose_spec``). None: no budget.
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
        binary_factory: str | None = None,
        max_index_memory: int | None = None,
    ) -> None:
        super().__init__()
        self.generation_dir, self.generation_rel = generation_dir, generation_rel
        self.num_shards, self.dim, self.hash_bits = num_shards, dim, hash_bits
        self.factory, self.nprobe, self.train_sample_size = (factory, nprobe, train_sample_size)
        self.binary_factory = binary_factory
        self.max_index_memory = max_index_memory

    def expand(self, feature_files):
        n, dim, bits = self.num_shards, self.dim, self.hash_bits
        read = feature_files | "ReadBlocks" >> beam.ParDo(
            _ReadBlocksFn(n, dim, bits, self.train_sample_size)
        ).with_outputs(SAMPLE_TAG, main="blocks")
        blocks = read.blocks
        trained = (
            read[SAMPLE_TAG]
            | "Sample" >> beam.CombineGlobally(_TrainingSample(self.train_sample_size, dim))
            | "Train"
            >> beam.Map(
                _train,
                dim=dim,
                hash_bits=bits,
                factory=self.factory,
                nprobe=self.nprobe,
                binary_factory=self.binary_factory,
                max_index_memory=self.max_index_memory,
            )
        )
        # Every shard exists even when no item hashes to it, so the manifest always lists num_shards shards.
        shard_keys = feature_files.pipeline | "AllShards" >> beam.Create([(s, None) for s in range(n)], reshuffle=False)
        shards = (
            (blocks, shard_keys)
            | "WithAllShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "FillShards"
            >> beam.ParDo(
                _FillShardFn(self.generation_dir, self.generation_rel, n, dim, bits),
                trained=beam.pvalue.AsSingleton(trained),
            )
        )
        spec = trained | "Spec" >> beam.Map(lambda t: t[0])
        return shards, spec
