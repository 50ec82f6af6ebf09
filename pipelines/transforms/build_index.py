"""BuildIndex: written feature files -> float and binary index shards, inside the Beam graph.

Each feature file is read column-wise (item id, content hash, embedding, code)
and cut into one ``Block`` per shard, and each block is spilled to a part file
under ``<generation>/_parts/``: what the runner shuffles is part paths, so no
runner holds the generation's vectors in memory (the local runner's GroupByKey
would hold all of them). A bottom-k sample by a hash of the item id trains the
empty index once; it is broadcast as a side input and the shards are filled in
parallel from their parts, each written with its id file; then the parts are
deleted. Items go to shards by a hash of their id and inside a shard rows are
in item-id order, so the result does not depend on how the runner split or
ordered the work.
"""

from __future__ import annotations

import hashlib
import logging

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines.transforms.timing import StageTimer
from retrieval_core import io as rio
from retrieval_core.index.build import (
    Block,
    bottom_k,
    choose_spec,
    id_keys,
    read_block,
    read_feature_block,
    train_vector_index,
    write_block,
    write_shard,
)

log = logging.getLogger(__name__)

SAMPLE_TAG = "sample"
PARTS_DIR = "_parts"
"""Under the generation folder: each shard's blocks between ReadBlocks and FillShards; deleted once every
shard is written (and with the generation, by ``prune``, if the run dies first)."""


def part_path(parts_dir: str, shard: int, feature_file: str) -> str:
    """Where ReadBlocks spills the rows of ``feature_file`` that go to ``shard``: named by a hash of the feature
    file's path, so a retried ReadBlocks overwrites its own parts."""
    digest = hashlib.sha256(feature_file.encode()).hexdigest()[:24]
    return rio.join(parts_dir, f"shard-{shard:05d}", f"{digest}.arrow")


class _ReadBlocksFn(beam.DoFn):
    """One feature file -> ``(shard, part path)`` for every shard that has rows in it, the part written by
    ``write_block``, and on ``SAMPLE_TAG`` the file's ``(row count, sample keys, vectors)`` already cut to its
    bottom ``sample_size``."""

    def __init__(self, parts_dir: str, num_shards: int, dim: int, hash_bits: int, sample_size: int) -> None:
        self.parts_dir = parts_dir
        self.num_shards, self.dim, self.hash_bits, self.sample_size = num_shards, dim, hash_bits, sample_size
        self.rows = Metrics.counter("build_index", "rows_read")
        self.timer = StageTimer("build_index", "read_features")

    def process(self, path: str):
        with self.timer.time():
            block = read_feature_block(path, self.dim, self.hash_bits)
            shard_keys, sample_keys = id_keys(block.item_ids)
            # A file's rows beyond sample_size cannot be in the sample; sorting the rest is left to the combine.
            sample = (
                bottom_k(sample_keys, block.vectors, self.sample_size)
                if len(block) > self.sample_size
                else (sample_keys, block.vectors)
            )
            parts = []
            for shard, part in block.split_by_shard(self.num_shards, shard_keys).items():
                target = part_path(self.parts_dir, shard, path)
                write_block(target, part)
                parts.append((shard, target))
        self.rows.inc(len(block))
        yield beam.pvalue.TaggedOutput(SAMPLE_TAG, (len(block), *sample))
        yield from parts


class _TrainingSample(beam.CombineFn):
    """Per-file samples -> ``(row count, the sample_size vectors with the smallest sample keys)``.

    Order-independent (see ``bottom_k``): the same rows give the same sample on any runner. Samples are
    buffered and cut to the bottom ``sample_size`` only when the buffer passes ``COMPACT_AT`` times that (and
    before an accumulator is shuffled or read out), not once per file, which re-sorted the whole sample each time.
    """

    COMPACT_AT = 2

    def __init__(self, sample_size: int, dim: int) -> None:
        self.sample_size, self.dim = sample_size, dim

    def create_accumulator(self):
        return [0, [], []]  # row count, key arrays, vector arrays

    def _compact(self, acc, force: bool = False):
        _, keys, vectors = acc
        if keys and (force or sum(map(len, keys)) > self.COMPACT_AT * self.sample_size):
            kept_keys, kept = bottom_k(keys, vectors, self.sample_size)
            keys[:], vectors[:] = [kept_keys], [kept]
        return acc

    def add_input(self, acc, sample):
        count, keys, vectors = sample
        acc[0] += count
        acc[1].append(keys)
        acc[2].append(vectors)
        return self._compact(acc)

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for count, keys, vectors in accumulators:
            merged[0] += count
            merged[1] += keys
            merged[2] += vectors
        return self._compact(merged)

    def compact(self, acc):
        return self._compact(acc, force=True)

    def extract_output(self, acc):
        count, _, vectors = self._compact(acc, force=True)
        return count, vectors[0] if vectors else np.zeros((0, self.dim), np.float32)


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
    with StageTimer("build_index", "train").time():
        return spec, train_vector_index(vectors, dim, spec)


class _FillShardFn(beam.DoFn):
    """Fill one shard from its part files and the trained empty index (a side input); write its three files."""

    def __init__(self, generation_dir: str, generation_rel: str, num_shards: int, dim: int, hash_bits: int) -> None:
        self.generation_dir = generation_dir
        self.generation_rel = generation_rel
        self.num_shards = num_shards
        self.dim = dim
        self.hash_bits = hash_bits
        self.vectors_added = Metrics.counter("build_index", "vectors_added")
        self.timer = StageTimer("build_index", "fill_and_write_shard")

    def process(self, keyed, trained):
        shard, parts = keyed
        spec, empty_index = trained
        with self.timer.time():
            block = Block.concat(
                (read_block(p, self.dim, self.hash_bits) for p in sorted(p for p in parts if p is not None)),
                self.dim,
                self.hash_bits,
            )
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


def _remove_parts(_, parts_dir: str, results: list[dict]) -> list[dict]:
    """Delete the part files; a failure only logs (nothing reads parts after FillShards, ``prune`` deletes them
    with their generation), so a cleanup error cannot fail a run whose shards are all written."""
    try:
        rio.delete_tree(parts_dir)
    except Exception as e:  # any failure here is harmless, and worth a warning
        log.warning("could not delete BuildIndex part files under %s (%s); prune deletes them later", parts_dir, e)
    return results


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
        parts_dir = rio.join(self.generation_dir, PARTS_DIR)
        read = feature_files | "ReadBlocks" >> beam.ParDo(
            _ReadBlocksFn(parts_dir, n, dim, bits, self.train_sample_size)
        ).with_outputs(SAMPLE_TAG, main="parts")
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
        filled = (
            (read.parts, shard_keys)
            | "WithAllShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "FillShards"
            >> beam.ParDo(
                _FillShardFn(self.generation_dir, self.generation_rel, n, dim, bits),
                trained=beam.pvalue.AsSingleton(trained),
            )
        )
        # The shard results pass through one step that runs after every shard is written and deletes the parts
        # first; deleting what is already gone is fine, so a retried step does no harm.
        shards = (
            feature_files.pipeline
            | "AfterFill" >> beam.Create([None], reshuffle=False)
            | "RemoveParts" >> beam.FlatMap(_remove_parts, parts_dir=parts_dir, results=beam.pvalue.AsList(filled))
        )
        spec = trained | "Spec" >> beam.Map(lambda t: t[0])
        return shards, spec
