"""Hamming shards: exact k-NN and radius search over packed binary codes.

Small shards are ``IndexBinaryFlat`` (``BFlat``): an exhaustive popcount scan.
Large ones are faiss's multi-index hashing, ``IndexBinaryMultiHash``
(``BHash<m>x<b>``): the code is cut into ``m`` disjoint ``b``-bit substrings,
each the key of a hash table. Two codes within Hamming distance ``r < m`` agree
exactly on at least one substring (pigeonhole), so looking a query's ``m``
substrings up finds every code within radius ``m - 1``; each candidate is then
checked against the full code. With ``nflip`` bits flipped per lookup the exact
radius is ``m * (nflip + 1) - 1``. The index keeps every code in its
``storage`` (an ``IndexBinaryFlat``), which serves whatever the tables cannot
answer exactly.

Both functions here give exactly what ``IndexBinaryFlat`` gives: the same
neighbours, with ties at equal distance broken by the smaller id (faiss ids in
a shard are in item-id order, so this is the Searcher's tie rule too).
"""

from __future__ import annotations

import faiss
import numpy as np

EXACT_RADIUS = 2
"""The radius a multi-hash shard answers from its tables alone: ``BHash3x<b>`` has 3 substrings."""

HASH_MIN_ROWS = 200_000
"""From this many codes in a generation on, its Hamming shards are multi-hash (below, a scan is as fast)."""

MIN_SUBSTRING_BITS = 16
"""Shortest substring worth a hash table: fewer bits put too many codes in each bucket."""


def choose_binary_factory(n_total: int, hash_bits: int) -> str:
    """``BHash3x<b>`` (b = hash_bits // 3) for large generations of long enough codes, else ``BFlat``."""
    substrings = EXACT_RADIUS + 1
    bits = hash_bits // substrings
    if n_total < HASH_MIN_ROWS or bits < MIN_SUBSTRING_BITS:
        return "BFlat"
    return f"BHash{substrings}x{bits}"


def exact_radius(index: faiss.IndexBinary) -> int:
    """Largest radius whose range search this index answers exactly from its hash tables (-1: none)."""
    if isinstance(index, faiss.IndexBinaryMultiHash):
        return index.nhash * (index.nflip + 1) - 1
    return -1


def scan_index(index: faiss.IndexBinary) -> faiss.IndexBinary:
    """The exhaustive index behind ``index``: its flat ``storage`` for a multi-hash shard, else itself."""
    return index.storage if isinstance(index, faiss.IndexBinaryMultiHash) else index


_ID_BITS = 40
_ID_MASK = (1 << _ID_BITS) - 1


def _sorted_per_query(lims: np.ndarray, dist: np.ndarray, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """faiss range-search output -> per query ``(distances, ids)`` sorted by distance then id."""
    # (distance, id) packed in one int64 (ids < 2^40, distances < 2^23): one small sort per query, no lexsort.
    keys = (dist.astype(np.int64) << _ID_BITS) | ids
    out = []
    for q in range(len(lims) - 1):
        key = np.sort(keys[lims[q] : lims[q + 1]])
        out.append(((key >> _ID_BITS).astype(np.int32), key & _ID_MASK))
    return out


def range_search(index: faiss.IndexBinary, queries: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every code within Hamming distance ``radius`` (inclusive) of each query: ``(distances, ids)`` per query,
    sorted by distance then id. Exact for any radius: beyond ``exact_radius`` the scan answers."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    queries = np.ascontiguousarray(queries, dtype=np.uint8)
    source = index if radius <= exact_radius(index) else scan_index(index)
    return _sorted_per_query(*source.range_search(queries, radius + 1))  # faiss keeps distances < its radius


def knn(index: faiss.IndexBinary, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest codes of each query, ``(distances, ids)`` of shape (nq, k), -1 ids where the shard
    holds fewer than ``k``; exactly ``IndexBinaryFlat.search``'s answer.

    On a multi-hash shard, a query with at least ``k`` codes within ``exact_radius`` takes its ``k`` nearest
    from that range search (complete, so exact); the other queries are scanned.
    """
    queries = np.ascontiguousarray(queries, dtype=np.uint8)
    radius = exact_radius(index)
    if radius < 0 or len(queries) == 0:
        return index.search(queries, k)
    dist = np.full((len(queries), k), np.iinfo(np.int32).max, np.int32)
    ids = np.full((len(queries), k), -1, np.int64)
    found = _sorted_per_query(*index.range_search(queries, radius + 1))
    counts = np.array([len(f[1]) for f in found])
    for q in np.flatnonzero(counts >= k):
        dist[q], ids[q] = found[q][0][:k], found[q][1][:k]
    rest = np.flatnonzero(counts < k)
    if len(rest):
        dist[rest], ids[rest] = scan_index(index).search(queries[rest], k)
    return dist, ids
