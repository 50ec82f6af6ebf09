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
import math
from dataclasses import dataclass

import faiss
import numpy as np

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
