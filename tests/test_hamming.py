"""Hamming shards (multi-index hashing and flat) against a numpy popcount brute force."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval_core.eval.retrieval import hamming_distances
from retrieval_core.index import hamming


def clustered_codes(n: int, bits: int, seed: int, clusters: int = 40, flip: float = 0.04) -> np.ndarray:
    """Codes near a few centres, as a semantic hash gives: many close pairs and many exact ties."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2, (clusters, bits), dtype=np.uint8)
    noisy = centres[rng.integers(0, clusters, n)] ^ (rng.random((n, bits)) < flip)
    return np.packbits(noisy.astype(np.uint8), axis=1)


def oracle(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return hamming_distances(queries, codes)


CASES = [(64, "BHash3x21"), (64, "BFlat"), (16, "BHash3x5"), (48, "BHash3x16")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}bit-{f}" for b, f in CASES])
def shard(request):
    bits, factory = request.param
    codes = clustered_codes(6000, bits, seed=bits)
    index = faiss.index_binary_factory(bits, factory)
    index.add(codes)
    rng = np.random.default_rng(1)
    queries = np.concatenate([codes[rng.choice(len(codes), 40, replace=False)], clustered_codes(20, bits, seed=99)])
    return index, codes, queries


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 5])
def test_range_search_is_exact_at_every_radius(shard, radius):
    index, codes, queries = shard
    dist = oracle(queries, codes)
    found = hamming.range_search(index, queries, radius)
    for q, (d, ids) in enumerate(found):
        expect = np.flatnonzero(dist[q] <= radius)
        expect = expect[np.lexsort((expect, dist[q][expect]))]
        assert ids.tolist() == expect.tolist()
        assert d.tolist() == dist[q][expect].tolist()


@pytest.mark.parametrize("k", [1, 10, 200])
def test_knn_equals_exhaustive_search_ties_by_id(shard, k):
    index, codes, queries = shard
    dist = oracle(queries, codes)
    d, ids = hamming.knn(index, queries, k)
    for q in range(len(queries)):
        expect = np.lexsort((np.arange(len(codes)), dist[q]))[:k]
        assert ids[q].tolist() == expect.tolist()
        assert d[q].tolist() == dist[q][expect].tolist()
    flat = faiss.IndexBinaryFlat(index.d)
    flat.add(codes)
    fd, fi = flat.search(queries, k)
    assert np.array_equal(fd, d) and np.array_equal(fi, ids)  # the very answer IndexBinaryFlat gives


def test_multi_hash_answers_close_queries_from_its_tables():
    """The point of the index: radius-2 lookups touch only the buckets, not every code."""
    codes = clustered_codes(6000, 64, seed=3)
    index = faiss.index_binary_factory(64, "BHash3x21")
    index.add(codes)
    assert hamming.exact_radius(index) == 2
    stats = faiss.cvar.indexBinaryHash_stats
    stats.reset()
    hamming.range_search(index, codes[:10], 2)
    assert 0 < stats.ndis < 10 * len(codes) / 4  # candidates checked, far fewer than a scan
    assert hamming.exact_radius(faiss.IndexBinaryFlat(64)) == -1


def test_shards_smaller_than_k_and_empty_shards():
    codes = clustered_codes(5, 64, seed=4)
    index = faiss.index_binary_factory(64, "BHash3x21")
    index.add(codes)
    d, ids = hamming.knn(index, codes[:2], 8)
    assert (ids[:, 5:] == -1).all() and sorted(ids[0, :5].tolist()) == list(range(5))
    empty = faiss.index_binary_factory(64, "BHash3x21")
    assert hamming.knn(empty, codes[:2], 3)[1].tolist() == [[-1] * 3] * 2
    assert [ids.tolist() for _, ids in hamming.range_search(empty, codes[:2], 2)] == [[], []]
    with pytest.raises(ValueError, match="radius"):
        hamming.range_search(index, codes[:1], -1)


def test_factory_is_chosen_by_size_and_code_length():
    assert hamming.choose_binary_factory(1000, 64) == "BFlat"
    assert hamming.choose_binary_factory(1_000_000, 64) == "BHash3x21"
    assert hamming.choose_binary_factory(1_000_000, 48) == "BHash3x16"
    assert hamming.choose_binary_factory(1_000_000, 32) == "BFlat"  # 10-bit substrings: buckets too full
