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
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core import io as rio
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


def shard_of(item_id: str, num_shards: int) -> int:
    """Stable shard assignment by item id (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") % num_shards


def choose_spec(n_total: int, factory: str | None = None, nprobe: int | None = None) -> IndexSpec:
    """Pick an index type from the number of vectors, unless ``factory`` forces one.

    Flat (exact) up to ``FLAT_MAX_ROWS``; above that ``IVF<nlist>,Flat`` with
    nlist ~ 4 sqrt(n) rounded to a power of two, probing 1/16 of the lists.
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
    return IndexSpec(vector_factory=factory, binary_factory="BFlat", nprobe=nprobe)


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
    items: Sequence[tuple[str, str, np.ndarray, bytes]],
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
        items: ``(item_id, content_sha256, embedding, packed code)``; written in item-id order.
        spec, trained: the index spec and its trained empty index (``train_vector_index``).

    Returns:
        ``{"shard": s, "vectors": entry, "hamming": entry, "ids": entry}``, each entry a dict of
        ``path`` (relative), ``sha256``, ``bytes`` and ``rows``.
    """
    items = sorted(items, key=lambda t: t[0])
    if items:
        vectors = np.stack([t[2] for t in items]).astype(np.float32)
        codes = np.stack([np.frombuffer(t[3], np.uint8) for t in items])
    else:
        vectors, codes = np.zeros((0, dim), np.float32), np.zeros((0, hash_bits // 8), np.uint8)
    ids = pa.table(
        {
            "faiss_id": pa.array(range(len(items)), pa.int64()),
            "item_id": pa.array([t[0] for t in items], pa.string()),
            "content_sha256": pa.array([t[1] for t in items], pa.string()),
        },
        schema=IDS_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(ids, buf, compression="zstd")
    files = (
        ("vectors", "faiss", serialize_index(fill_vector_shard(trained, vectors, spec.nprobe))),
        ("hamming", "faiss", serialize_index(fill_binary_shard(codes, hash_bits, spec.binary_factory))),
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
            "rows": len(items),
        }
    return result
