"""Exact class-relevance evaluation of Hamming ranking, for deep-hashing benchmarks.

The setting is the usual one of deep-hashing papers: every query is ranked against the
whole database by Hamming distance between packed binary codes, and a database item is
relevant when it has the query's class label. The per-query metrics come from
:mod:`retrieval_core.eval.metrics`; this module computes the distances, the ranking and
the relevance arrays chunk by chunk and averages.

Tie-breaking: Hamming distances take only K+1 values, so a query has thousands of
database items at the same distance, and where a tied block is cut (top k) and how
relevant items are ordered inside it changes mAP, P@k and R@k. Some published code
leaves this to an unstable sort (results then depend on the sort algorithm), other code
breaks ties in the caller's favour. Here ties are broken by ascending database index
(the item id), always: ``np.argsort(..., kind="stable")`` keeps equal distances in
database order. This is neither optimistic nor pessimistic in expectation when the
database order is unrelated to relevance, and it makes results reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval_core.eval.metrics import (
    average_precision,
    average_precision_at_k,
    precision_at_k,
    precision_recall_by_radius,
    recall_at_k,
)


def _as_words(codes: np.ndarray) -> np.ndarray:
    """(n, B) packed uint8 codes -> (n, ceil(B/8)) uint64 words, zero-padded.

    The zero padding is the same for both sides, so it never contributes to a XOR; the
    byte order inside a word does not matter either, since only the popcount is used.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise ValueError(f"codes must be (n, bytes) uint8 (np.packbits output), got {codes.dtype} {codes.shape}")
    n, n_bytes = codes.shape
    n_words = max(1, -(-n_bytes // 8))
    padded = np.zeros((n, n_words * 8), dtype=np.uint8)
    padded[:, :n_bytes] = codes
    return padded.view(np.uint64)


def _word_distances(query_words: np.ndarray, db_words: np.ndarray) -> np.ndarray:
    """Pairwise popcount(XOR) of (nq, W) and (nd, W) uint64 words -> (nq, nd) uint8 or uint16."""
    n_words = query_words.shape[1]
    # One word is the common case (codes up to 64 bits): bitwise_count already gives uint8.
    dist = np.bitwise_count(np.bitwise_xor(query_words[:, 0, None], db_words[None, :, 0]))
    if n_words == 1:
        return dist
    dtype = np.uint8 if 64 * n_words <= np.iinfo(np.uint8).max else np.uint16
    dist = dist.astype(dtype)
    # Word by word rather than one (nq, nd, W) XOR: the intermediate stays (nq, nd).
    for w in range(1, n_words):
        dist += np.bitwise_count(np.bitwise_xor(query_words[:, w, None], db_words[None, :, w]))
    return dist


def packed_hamming_distances(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """(nq, B) x (nd, B) packed uint8 codes -> (nq, nd) Hamming distances.

    ``np.bitwise_count`` on the XOR of 64-bit words, any byte length B. The result is
    uint8 while it fits (up to 192 bits), uint16 beyond. Memory is (nq, nd) of that dtype;
    chunk the queries for large problems (as :func:`hamming_ranking_metrics` does).
    """
    query_words, db_words = _as_words(query_codes), _as_words(db_codes)
    if np.shape(query_codes)[1] != np.shape(db_codes)[1]:
        raise ValueError(f"code lengths differ: {np.shape(query_codes)[1]} vs {np.shape(db_codes)[1]} bytes")
    return _word_distances(query_words, db_words)


def hamming_ranking_metrics(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    db_codes: np.ndarray,
    db_labels: np.ndarray,
    *,
    ks: Sequence[int] = (100, 1000),
    map_at: Sequence[int] = (1000,),
    radii: Sequence[int] = (2,),
    curve_ks: Sequence[int] = (1, 10, 100, 1000, 5000),
    chunk: int = 256,
    n_bits: int | None = None,
) -> dict:
    """Exact class-relevance metrics of Hamming ranking, every query against the whole database.

    Relevant = same label. Ranking is by Hamming distance with ties broken by ascending
    database index (see the module docstring). Queries are processed ``chunk`` at a time,
    so memory is a few (chunk, n_database) arrays, never (n_queries, n_database).

    Args:
        query_codes: (nq, B) uint8 packed codes (``np.packbits``, MSB first).
        query_labels: (nq,) class labels.
        db_codes: (nd, B) uint8 packed codes.
        db_labels: (nd,) class labels.
        ks: cut-offs for ``precision_at_<k>`` and ``recall_at_<k>``; each in 1..nd.
        map_at: cut-offs for ``map_at_<k>`` (deep-hashing AP@k, see
            :func:`~retrieval_core.eval.metrics.average_precision_at_k`); each in 1..nd.
        radii: Hamming radii for ``precision_r<r>`` and ``retrieved_r<r>``; each in 0..n_bits.
        curve_ks: cut-offs of the P@k curve; those above nd are dropped (the curve is a
            plot, unlike ``ks``, which are reported numbers and raise).
        chunk: queries per chunk.
        n_bits: code length in bits, for the radius range; defaults to 8 * B.

    Returns:
        Flat floats ``map_all``, ``map_at_<k>``, ``precision_at_<k>``, ``recall_at_<k>``,
        ``precision_r<r>`` (0 for a query whose ball is empty), ``retrieved_r<r>`` (fraction
        of queries whose ball is not empty), all means over queries; and ``curves``:
        ``{"precision_at_k_curve": {k: float}, "pr_curve": {"radius": [...],
        "precision": [...], "recall": [...]}}`` (lists, JSON-ready; the radius curve as in
        :func:`~retrieval_core.eval.metrics.pr_curve_by_radius`).

    Raises:
        ValueError: on mismatched shapes, no queries, or a k / radius out of range.
    """
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    query_words, db_words = _as_words(query_codes), _as_words(db_codes)
    nq, nd = len(query_words), len(db_words)
    n_bytes = np.shape(query_codes)[1]
    if np.shape(db_codes)[1] != n_bytes:
        raise ValueError(f"code lengths differ: {n_bytes} vs {np.shape(db_codes)[1]} bytes")
    if query_labels.shape != (nq,) or db_labels.shape != (nd,):
        raise ValueError("labels must be 1-D, one per code")
    if nq == 0 or nd == 0:
        raise ValueError("need at least one query and one database item")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n_bits = 8 * n_bytes if n_bits is None else n_bits
    # Deduplicate (keeping order): a repeated k would otherwise be accumulated twice into one key.
    ks, map_at, radii = (list(dict.fromkeys(values)) for values in (ks, map_at, radii))
    # Check cut-offs before the long pass rather than failing in its first chunk.
    for k in (*ks, *map_at):
        if not 1 <= k <= nd:
            raise ValueError(f"k={k} is outside 1..{nd} (the database size)")
    for r in radii:
        if not 0 <= r <= n_bits:
            raise ValueError(f"radius {r} is outside 0..{n_bits}")
    curve_ks = [k for k in dict.fromkeys(curve_ks) if 1 <= k <= nd]

    sums: dict[str, float] = {"map_all": 0.0}
    sums.update({f"map_at_{k}": 0.0 for k in map_at})
    for k in ks:
        sums[f"precision_at_{k}"] = 0.0
        sums[f"recall_at_{k}"] = 0.0
    for r in radii:
        sums[f"precision_r{r}"] = 0.0
        sums[f"retrieved_r{r}"] = 0.0
    curve_sums = np.zeros(len(curve_ks))
    pr_precision = np.zeros(n_bits + 1)
    pr_recall = np.zeros(n_bits + 1)

    # Labels as small dense ints: gathering them in rank order (db_ids[order]) is then a
    # cheap gather of bytes, and each query's relevant count is its class's database count.
    classes, inverse = np.unique(np.concatenate([query_labels, db_labels]), return_inverse=True)
    ids = inverse.astype(np.min_scalar_type(len(classes)))
    query_ids, db_ids = ids[:nq], ids[nq:]
    class_sizes = np.bincount(db_ids, minlength=len(classes))

    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        dist = _word_distances(query_words[start:stop], db_words)
        chunk_ids = query_ids[start:stop, None]
        n_relevant = class_sizes[query_ids[start:stop]]
        # Stable sort: equal distances stay in database-index order (the tie rule); for
        # uint8 / uint16 keys numpy uses a radix sort, so this is also the fast choice.
        order = np.argsort(dist, axis=1, kind="stable")
        relevant = db_ids[order] == chunk_ids
        del order

        sums["map_all"] += average_precision(relevant, n_relevant).sum()
        for k in map_at:
            sums[f"map_at_{k}"] += average_precision_at_k(relevant, k).sum()
        for k in ks:
            sums[f"precision_at_{k}"] += precision_at_k(relevant, k).sum()
            sums[f"recall_at_{k}"] += recall_at_k(relevant, n_relevant, k).sum()
        for i, k in enumerate(curve_ks):
            curve_sums[i] += precision_at_k(relevant, k).sum()
        del relevant

        # All radii at once; the scalar radius metrics are columns of the same curve.
        mask = db_ids[None, :] == chunk_ids
        precision_r, recall_r, retrieved_r = precision_recall_by_radius(dist, mask, n_bits)
        pr_precision += precision_r.sum(axis=0)
        pr_recall += recall_r.sum(axis=0)
        for r in radii:
            sums[f"precision_r{r}"] += precision_r[:, r].sum()
            sums[f"retrieved_r{r}"] += np.count_nonzero(retrieved_r[:, r])

    out: dict = {key: float(value / nq) for key, value in sums.items()}
    out["curves"] = {
        "precision_at_k_curve": {int(k): float(v / nq) for k, v in zip(curve_ks, curve_sums)},
        "pr_curve": {
            "radius": list(range(n_bits + 1)),
            "precision": (pr_precision / nq).tolist(),
            "recall": (pr_recall / nq).tolist(),
        },
    }
    return out
