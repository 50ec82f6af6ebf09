"""Index building as plain functions: choose -> train -> fill shard -> serialise.

The Beam ``BuildIndex`` transform wires these together (train once on a
sample, broadcast the trained empty index, fill shards in parallel); tests and
benchmarks call them directly. Faiss ids are positions: shard ``s`` holds rows
``offset[s] .. offset[s] + ntotal[s] - 1`` of the concatenated id files, so a
shard opened with plain ``faiss.read_index`` returns local row numbers and the
searcher adds the shard's offset.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core import io as rio
from retrieval_core.index.hamming import choose_binary_factory
from schemas import IDS_SCHEMA

FLAT_MAX_ROWS = 50_000
"""Below this many vectors an exact flat index is both fastest to build and exact."""

METRIC_TYPES = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass(frozen=True)
class IndexSpec:
    """What to build: the faiss factory strings and default search parameters, as recorded in the manifest."""

    vector_factory: str
    binary_factory: str
    nprobe: int
    metric: str = "inner_product"


INDEX_COLUMNS = ("item_id", "content_sha256", "embedding", "hash_code")
"""The feature-table columns an index is built from."""


def _id_digest(item_id: str) -> bytes:
    return hashlib.sha256(item_id.encode()).digest()


def shard_of(item_id: str, num_shards: int) -> int:
    """Stable shard assignment by item id (not Python's salted ``hash``)."""
    return int.from_bytes(_id_digest(item_id)[:8], "big") % num_shards


def id_keys(item_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two independent stable 64-bit keys per item id: ``(shard key, sample key)``.

    ``shard key % num_shards`` is ``shard_of``; the sample key orders items for the
    order-independent training sample (``bottom_k``).
    """
    digests = np.frombuffer(b"".join(_id_digest(i)[:16] for i in item_ids), dtype=">u8").reshape(-1, 2)
    return digests[:, 0].astype(np.uint64), digests[:, 1].astype(np.uint64)


@dataclass(frozen=True)
class Block:
    """Feature rows reduced to what an index needs, column-wise: the unit BuildIndex moves between workers.

    ``item_ids`` and ``content_sha256`` are object arrays of str, ``vectors`` is (n, dim) float32 and
    ``codes`` is (n, hash_bits/8) uint8.
    """

    item_ids: np.ndarray
    content_sha256: np.ndarray
    vectors: np.ndarray
    codes: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def empty(cls, dim: int, hash_bits: int) -> Block:
        return cls(
            np.zeros(0, object),
            np.zeros(0, object),
            np.zeros((0, dim), np.float32),
            np.zeros((0, hash_bits // 8), np.uint8),
        )

    @classmethod
    def from_table(cls, table: pa.Table, dim: int, hash_bits: int) -> Block:
        """From an Arrow table with the ``INDEX_COLUMNS`` of the feature schema (no per-row Python objects)."""
        n = table.num_rows
        if n == 0:
            return cls.empty(dim, hash_bits)
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(n, dim)
        width = hash_bits // 8
        codes = np.concatenate(
            [
                np.frombuffer(c.buffers()[1], np.uint8)[c.offset * width : (c.offset + len(c)) * width]
                for c in table.column("hash_code").chunks
            ]
        ).reshape(n, width)
        return cls(
            np.asarray(table.column("item_id").to_pylist(), dtype=object),
            np.asarray(table.column("content_sha256").to_pylist(), dtype=object),
            np.ascontiguousarray(vectors, dtype=np.float32),
            codes,
        )

    def take(self, rows: np.ndarray) -> Block:
        return Block(self.item_ids[rows], self.content_sha256[rows], self.vectors[rows], self.codes[rows])

    def sorted_by_id(self) -> Block:
        return self.take(np.argsort(self.item_ids, kind="stable"))

    @staticmethod
    def concat(blocks: Iterable[Block], dim: int, hash_bits: int) -> Block:
        blocks = [b for b in blocks if len(b)]
        if not blocks:
            return Block.empty(dim, hash_bits)
        return Block(*(np.concatenate([getattr(b, f) for b in blocks]) for f in Block.__dataclass_fields__))

    def split_by_shard(self, num_shards: int, shard_keys: np.ndarray | None = None) -> dict[int, Block]:
        """The non-empty parts of this block, keyed by ``shard_of`` of their item ids (``shard_keys``: the first
        key of ``id_keys``, if the caller has it already)."""
        if shard_keys is None:
            shard_keys, _ = id_keys(self.item_ids)
        shards = (shard_keys % np.uint64(num_shards)).astype(np.int64)
        return {int(s): self.take(np.flatnonzero(shards == s)) for s in np.unique(shards)}


def read_feature_block(path: str, dim: int, hash_bits: int) -> Block:
    """The index columns of one feature Parquet file (local or URI)."""
    return Block.from_table(rio.read_parquet(path, columns=list(INDEX_COLUMNS)), dim, hash_bits)


def bottom_k(keys: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows with the smallest keys, in key order.

    Keeping the smallest hash keys is a sample that does not depend on how the
    rows were split or ordered (a bottom-k sketch), so the trained index is the
    same however the runner scheduled the work.
    """
    if len(keys) > k:
        keep = np.argpartition(keys, k - 1)[:k]
        keys, vectors = keys[keep], vectors[keep]
    order = np.argsort(keys, kind="stable")
    return keys[order], vectors[order]


def choose_spec(
    n_total: int,
    factory: str | None = None,
    nprobe: int | None = None,
    hash_bits: int | None = None,
    binary_factory: str | None = None,
) -> IndexSpec:
    """Pick the index types from the number of vectors, unless ``factory`` / ``binary_factory`` force them.

    Vectors: Flat (exact) up to ``FLAT_MAX_ROWS``; above that ``IVF<nlist>,Flat`` with
    nlist ~ 4 sqrt(n) rounded to a power of two, probing 1/16 of the lists.
    Codes: ``hamming.choose_binary_factory`` (multi-index hashing for large generations; both exact).
    """
    if factory is None:
        if n_total <= FLAT_MAX_ROWS:
            factory = "Flat"
        else:
            nlist = 2 ** round(math.log2(4 * math.sqrt(n_total)))
            factory = f"IVF{min(max(nlist, 16), 65536)},Flat"
    nlist = _nlist(factory)
    if nprobe is None:
        nprobe = max(1, nlist // 16) if nlist else 1
    if binary_factory is None:
        binary_factory = choose_binary_factory(n_total, hash_bits) if hash_bits else "BFlat"
    return IndexSpec(vector_factory=factory, binary_factory=binary_factory, nprobe=nprobe)


def _nlist(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head[3:].split("_")[0]) if head.startswith("IVF") and head[3:].split("_")[0].isdigit() else 0


def train_vector_index(sample: np.ndarray, dim: int, spec: IndexSpec) -> bytes:
    """Create the empty index of ``spec``, train it on ``sample`` if it needs training, and serialise it."""
    index = faiss.index_factory(dim, spec.vector_factory, METRIC_TYPES[spec.metric])
    if not index.is_trained:
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        nlist = _nlist(spec.vector_factory)
        if len(sample) < max(nlist, 1):
            raise ValueError(f"{spec.vector_factory} needs at least {nlist} training vectors, got {len(sample)}")
        index.train(sample)
    return serialize_index(index)


def fill_vector_shard(trained: bytes, vectors: np.ndarray, nprobe: int = 1) -> faiss.Index:
    """A copy of the trained empty index with ``vectors`` added in order (ids 0..n-1)."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    return index


def fill_binary_shard(codes: np.ndarray, hash_bits: int, factory: str = "BFlat") -> faiss.IndexBinary:
    """A binary index of packed codes ((n, bits/8) uint8), ids 0..n-1."""
    index = faiss.index_binary_factory(hash_bits, factory)
    if len(codes):
        index.add(np.ascontiguousarray(codes, dtype=np.uint8))
    return index


def serialize_index(index: faiss.Index | faiss.IndexBinary) -> bytes:
    if isinstance(index, faiss.IndexBinary):
        return faiss.serialize_index_binary(index).tobytes()
    return faiss.serialize_index(index).tobytes()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_name(kind: str, shard: int, num_shards: int, ext: str) -> str:
    """``vectors/shard-00001-of-00004.faiss``: zero-padded so names sort in shard order."""
    return f"{kind}/shard-{shard:05d}-of-{num_shards:05d}.{ext}"


def write_shard(
    generation_dir: str,
    generation_rel: str,
    shard: int,
    num_shards: int,
    block: Block,
    spec: IndexSpec,
    trained: bytes,
    dim: int,
    hash_bits: int,
) -> dict:
    """Fill and write one shard: float index, binary index and id file, each atomically.

    Args:
        generation_dir: where the generation's files go (local path or URI).
        generation_rel: the same, relative to the output root, for the returned paths.
        shard, num_shards: which shard this is.
        block: the shard's rows; written in item-id order.
        spec, trained: the index spec and its trained empty index (``train_vector_index``).

    Returns:
        ``{"shard": s, "vectors": entry, "hamming": entry, "ids": entry}``, each entry a dict of
        ``path`` (relative), ``sha256``, ``bytes`` and ``rows``.
    """
    block = block.sorted_by_id()
    if block.vectors.shape[1:] != (dim,) or block.codes.shape[1:] != (hash_bits // 8,):
        raise ValueError(
            f"shard {shard}: vectors {block.vectors.shape} / codes {block.codes.shape} "
            f"do not match dim {dim} / {hash_bits} bits"
        )
    ids = pa.table(
        {
            "faiss_id": pa.array(range(len(block)), pa.int64()),
            "item_id": pa.array(block.item_ids.tolist(), pa.string()),
            "content_sha256": pa.array(block.content_sha256.tolist(), pa.string()),
        },
        schema=IDS_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(ids, buf, compression="zstd")
    files = (
        ("vectors", "faiss", serialize_index(fill_vector_shard(trained, block.vectors, spec.nprobe))),
        ("hamming", "faiss", serialize_index(fill_binary_shard(block.codes, hash_bits, spec.binary_factory))),
        ("ids", "parquet", buf.getvalue()),
    )
    result: dict = {"shard": shard}
    for kind, ext, data in files:
        name = shard_name(kind, shard, num_shards, ext)
        rio.write_bytes_atomic(rio.join(generation_dir, name), data)
        result[kind] = {
            "path": f"{generation_rel}/{name}",
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "rows": len(block),
        }
    return result
