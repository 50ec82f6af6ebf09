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
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core import io as rio
from retrieval_core.index.hamming import choose_binary_factory
from schemas import IDS_SCHEMA

log = logging.getLogger(__name__)

FLAT_MAX_ROWS = 50_000
"""Below this many vectors an exact flat index is both fastest to build and exact."""

PQ_MIN_ROWS = 256 * 39
"""Product quantisation is a candidate only from this many vectors on: faiss wants 39 training points for each of
the 256 centroids of every sub-quantiser."""

REFINE_K_FACTOR = 4
"""A ``Refine`` index re-ranks ``k * REFINE_K_FACTOR`` candidates of its compressed base index with finer codes."""

METRIC_TYPES = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass(frozen=True)
class IndexSpec:
    """What to build: the faiss factory strings and default search parameters, as recorded in the manifest."""

    vector_factory: str
    binary_factory: str
    nprobe: int
    metric: str = "inner_product"
    estimated_bytes: int | None = None
    max_index_memory: int | None = None

    def selection(self) -> dict:
        """What the manifest records about the choice: the memory budget and the estimated size of all shards."""
        return {"max_index_memory": self.max_index_memory, "estimated_bytes": self.estimated_bytes}


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

    def to_table(self) -> pa.Table:
        """The ``INDEX_COLUMNS`` with the feature schema's types; ``from_table`` reads it back unchanged."""
        n, dim = self.vectors.shape
        width = self.codes.shape[1]
        vectors = pa.array(np.ascontiguousarray(self.vectors, dtype=np.float32).reshape(-1))
        codes = pa.py_buffer(np.ascontiguousarray(self.codes, dtype=np.uint8).tobytes())
        return pa.table(
            {
                "item_id": pa.array(self.item_ids.tolist(), pa.string()),
                "content_sha256": pa.array(self.content_sha256.tolist(), pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(vectors, dim),
                "hash_code": pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, codes]),
            }
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


def write_block(path: str, block: Block) -> None:
    """Spill a block to one Arrow IPC file (local or URI), atomically: BuildIndex's shard parts. Scratch files
    that no later run reads, so not fsynced."""
    table = block.to_table()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    rio.write_bytes_atomic(path, sink.getvalue(), fsync=False)


def read_block(path: str, dim: int, hash_bits: int) -> Block:
    """A block written by ``write_block``."""
    table = pa.ipc.open_file(pa.py_buffer(rio.read_bytes(path))).read_all()
    return Block.from_table(table, dim, hash_bits)


def bottom_k(
    keys: np.ndarray | list[np.ndarray], vectors: np.ndarray | list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows with the smallest keys, in key order.

    Keeping the smallest hash keys is a sample that does not depend on how the
    rows were split or ordered (a bottom-k sketch), so the trained index is the
    same however the runner scheduled the work. ``keys`` and ``vectors`` may be
    lists of parts (one pair of arrays per file): the result is that of the parts
    concatenated, but only the kept vectors are copied.
    """
    if not isinstance(keys, list):
        keys, vectors = [keys], [vectors]
    ends = np.cumsum([len(part) for part in keys])
    all_keys = np.concatenate(keys)
    rows = np.argpartition(all_keys, k - 1)[:k] if len(all_keys) > k else np.arange(len(all_keys))
    rows = rows[np.argsort(all_keys[rows], kind="stable")]
    part_of_row = np.searchsorted(ends, rows, side="right")
    kept = np.empty((len(rows), *vectors[0].shape[1:]), vectors[0].dtype)
    for part in np.unique(part_of_row):
        at = np.flatnonzero(part_of_row == part)
        kept[at] = vectors[part][rows[at] - (ends[part] - len(keys[part]))]
    return all_keys[rows], kept


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"300000000"`` -> bytes (binary units; ``B``/``iB`` suffixes optional)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"{text!r} is not a size (use e.g. 512M, 2G, 1.5GiB or a number of bytes)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


_PQ_TYPES = (faiss.IndexIVFPQ, faiss.IndexPQ)


def memory_per_vector(index: faiss.Index) -> tuple[float, int] | None:
    """``(bytes per vector, fixed bytes)`` a faiss index holds in memory when searched; None for a type it does
    not know. IVF: code plus 8-byte id per vector, the coarse centroids fixed; HNSW: storage plus the level-0
    links (2M int32) and about 5% for the upper levels; Refine: base plus refinement codes."""
    index = faiss.downcast_index(index)  # a view: the caller's reference keeps the index alive
    if isinstance(index, faiss.IndexRefine):
        base, refine = memory_per_vector(index.base_index), memory_per_vector(index.refine_index)
        return None if base is None or refine is None else (base[0] + refine[0], base[1] + refine[1])
    if isinstance(index, faiss.IndexPreTransform):
        inner = memory_per_vector(index.index)
        return None if inner is None else (inner[0], inner[1] + 4 * index.d * index.d * index.chain.size())
    codebooks = 4 * index.pq.M * index.pq.ksub * index.pq.dsub if isinstance(index, _PQ_TYPES) else 0
    if isinstance(index, faiss.IndexIVF):
        quantizer = memory_per_vector(index.quantizer)
        if quantizer is None:
            return None
        return index.code_size + 8, quantizer[1] + int(quantizer[0] * index.nlist) + codebooks
    if isinstance(index, faiss.IndexHNSW):
        storage = memory_per_vector(index.storage)
        links = 4 * index.hnsw.nb_neighbors(0) * 1.05 + 12
        return None if storage is None else (storage[0] + links, storage[1])
    if isinstance(index, faiss.IndexFlatCodes):
        return float(index.code_size), codebooks
    return None


def estimate_index_bytes(factory: str, n: int, dim: int, metric: str = "inner_product") -> int | None:
    """Memory of ``n`` vectors in the index ``factory`` builds (all shards together), or None if unknown."""
    index = faiss.index_factory(dim, factory, METRIC_TYPES[metric])
    per = memory_per_vector(index)
    return None if per is None else int(per[0] * n + per[1])


def _pq_subquantisers(dim: int) -> int:
    """Sub-quantisers for PQ: 4 dimensions each (the largest divisor of ``dim`` up to dim/4)."""
    return max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)


def candidate_factories(n_total: int, dim: int) -> list[str]:
    """Vector index types for ``n_total`` vectors, most accurate first (each smaller in memory than the last).

    Flat (exact) up to ``FLAT_MAX_ROWS``; ``IVF<nlist>,Flat`` (exact vectors, approximate only in the lists
    probed) with nlist ~ 4 sqrt(n) rounded to a power of two; from ``PQ_MIN_ROWS`` on, IVF-PQ with
    dim/4 sub-quantisers re-ranked by 8-bit scalar-quantised vectors (``Refine(SQ8)``), then IVF-PQ alone
    at dim/4 and dim/8 bytes per vector.
    """
    nlist = min(max(2 ** round(math.log2(4 * math.sqrt(max(n_total, 1)))), 16), 65536)
    out = ["Flat"] if n_total <= FLAT_MAX_ROWS else []
    out.append(f"IVF{nlist},Flat")
    if n_total >= PQ_MIN_ROWS:
        m = _pq_subquantisers(dim)
        out += [f"IVF{nlist},PQ{m},Refine(SQ8)", f"IVF{nlist},PQ{m}"]
        if m % 2 == 0:
            out.append(f"IVF{nlist},PQ{m // 2}")
    return out


def choose_spec(
    n_total: int,
    factory: str | None = None,
    nprobe: int | None = None,
    hash_bits: int | None = None,
    binary_factory: str | None = None,
    *,
    dim: int | None = None,
    max_index_memory: int | None = None,
) -> IndexSpec:
    """Pick the index types from the number of vectors and a memory budget, unless ``factory`` /
    ``binary_factory`` force them.

    Vectors: the first of ``candidate_factories`` whose estimated memory (``estimate_index_bytes``, all
    shards) fits in ``max_index_memory`` (no budget: the first, Flat or IVF-Flat). IVF probes 1/16 of its
    lists by default. Codes: ``hamming.choose_binary_factory`` (multi-index hashing for large generations;
    both exact). ``dim`` is needed to estimate memory; without it nothing is estimated.

    Raises:
        ValueError: no candidate fits in the budget.
    """
    if max_index_memory is not None and dim is None:
        raise ValueError("choose_spec: a memory budget needs the vector dimension")
    estimate = (lambda f: estimate_index_bytes(f, n_total, dim)) if dim else (lambda f: None)
    if factory is None:
        candidates = candidate_factories(n_total, dim or 4)
        factory = candidates[0]
        if max_index_memory is not None:
            sizes = {f: estimate(f) for f in candidates}
            fitting = [f for f in candidates if sizes[f] <= max_index_memory]
            if not fitting:
                smallest = min(candidates, key=sizes.get)
                raise ValueError(
                    f"max_index_memory {max_index_memory} bytes: no index of {n_total} x {dim} vectors fits; "
                    f"the smallest, {smallest}, needs about {sizes[smallest]} bytes"
                )
            factory = fitting[0]
    nlist = _nlist(factory)
    if nprobe is None:
        nprobe = max(1, nlist // 16) if nlist else 1
    if binary_factory is None:
        binary_factory = choose_binary_factory(n_total, hash_bits) if hash_bits else "BFlat"
    return IndexSpec(
        vector_factory=factory,
        binary_factory=binary_factory,
        nprobe=nprobe,
        estimated_bytes=estimate(factory),
        max_index_memory=max_index_memory,
    )


def _nlist(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head[3:].split("_")[0]) if head.startswith("IVF") and head[3:].split("_")[0].isdigit() else 0


def gpu_clustering_index(dim: int, metric: int) -> faiss.Index | None:
    """An exact flat index over every GPU faiss sees, for the assignment step of the k-means that trains an IVF
    coarse quantiser (the costly part of training); None where faiss sees no GPU (faiss-cpu, or faiss-gpu on a
    machine without one)."""
    if faiss.get_num_gpus() == 0:
        return None
    return faiss.index_cpu_to_all_gpus(faiss.IndexFlat(dim, metric))


def train_index(index: faiss.Index, sample: np.ndarray, clustering_index: faiss.Index | None = None) -> None:
    """``index.train(sample)``, with an IVF coarse quantiser's k-means assigning on ``clustering_index``
    (default: ``gpu_clustering_index``, so on the GPUs when there are any, else on the quantiser itself, on the
    CPU). It must search exactly with the quantiser's metric; the centroids, and so the index, are then the same
    up to float rounding."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if clustering_index is None:
            clustering_index = gpu_clustering_index(ivf.d, ivf.quantizer.metric_type)  # after any PCA/OPQ
        if clustering_index is not None:
            log.info("IVF training: k-means assigns on %s", type(clustering_index).__name__)
        ivf.clustering_index = clustering_index  # read by train only, never serialised; alive while this runs
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    finally:
        if ivf is not None:
            ivf.clustering_index = None


def train_vector_index(
    sample: np.ndarray, dim: int, spec: IndexSpec, clustering_index: faiss.Index | None = None
) -> bytes:
    """Create the empty index of ``spec``, train it on ``sample`` if it needs training (``train_index``, which
    ``clustering_index`` goes to), and serialise it."""
    index = faiss.index_factory(dim, spec.vector_factory, METRIC_TYPES[spec.metric])
    if not index.is_trained:
        nlist = _nlist(spec.vector_factory)
        if len(sample) < max(nlist, 1):
            raise ValueError(f"{spec.vector_factory} needs at least {nlist} training vectors, got {len(sample)}")
        train_index(index, sample, clustering_index)
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_K_FACTOR
    return serialize_index(index)


def fill_vector_shard(trained: bytes, vectors: np.ndarray, nprobe: int = 1) -> faiss.Index:
    """A copy of the trained empty index with ``vectors`` added in order (ids 0..n-1)."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
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
