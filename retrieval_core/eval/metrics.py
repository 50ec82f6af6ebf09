"""Retrieval metrics shared by every evaluation.

Two families, with two input conventions:

* Product retrieval (:func:`hit_rate_at_k`): ``ranked`` is an (n_queries, k) array of
  gallery labels in rank order (best first; ties already broken by the caller, by id),
  with ``-1`` for empty slots; ``targets`` holds each query's relevant label.

* Class-relevance retrieval (deep-hashing benchmarks: relevant = same class):
  ``relevant`` is an (n_queries, n) bool array in rank order (best first; ties already
  broken by the caller, see :mod:`retrieval_core.eval.hashing`), covering either the
  WHOLE ranked database or only its first k entries; ``n_relevant`` is each query's total
  number of relevant items in the whole database (not just in the ``n`` columns given),
  because recall and AP are normalised by it. The radius metrics instead take
  ``distances`` and ``relevant_mask`` as (n_queries, n) arrays in database order (not
  ranked), since a Hamming ball does not depend on an order.

  These functions return (n_queries,) float64 per-query values and leave averaging to the
  caller, so that a large evaluation can be computed in chunks of queries and averaged
  once. A query with no relevant item scores 0 on AP and recall (it counts in the mean).
  A ``k`` outside ``1..n`` raises ``ValueError`` rather than being clamped, as in
  :func:`hit_rate_at_k`: a silently shorter list would change what "@k" means.
"""

from __future__ import annotations

import numpy as np


def hit_rate_at_k(ranked: np.ndarray, targets: np.ndarray, k: int) -> float:
    """R@k of product retrieval: the fraction of queries with a hit in the top ``k``.

    A hit is a result whose label equals the query's target label. This is what the
    product-retrieval literature calls recall@k; it is not the class-relevance
    :func:`recall_at_k` (relevant retrieved / all relevant).

    Args:
        ranked: (n_queries, m) labels in rank order, ``-1`` for empty slots.
        targets: (n_queries,) each query's relevant label.
        k: cut-off, at most ``m``.

    Returns:
        The hit rate, or NaN when there are no queries.

    Raises:
        ValueError: if ``k`` exceeds the number of results per query.
    """
    ranked = np.asarray(ranked)
    if ranked.shape[0] == 0:
        return float("nan")
    if k > ranked.shape[1]:
        raise ValueError(f"k={k} exceeds the {ranked.shape[1]} results per query")
    hits = (ranked[:, :k] == np.asarray(targets)[:, None]).any(axis=1)
    return float(hits.mean())


def _as_relevant(relevant: np.ndarray) -> np.ndarray:
    relevant = np.asarray(relevant)
    if relevant.ndim != 2:
        raise ValueError(f"relevant must be (n_queries, n), got shape {relevant.shape}")
    return relevant.astype(bool, copy=False)


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside 1..{n} (the ranked list has {n} entries)")


def _as_n_relevant(n_relevant: np.ndarray, n_queries: int) -> np.ndarray:
    n_relevant = np.asarray(n_relevant)
    if n_relevant.shape != (n_queries,):
        raise ValueError(f"n_relevant must have shape ({n_queries},), got {n_relevant.shape}")
    return n_relevant


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float64, 0 where den == 0 (no relevant / nothing retrieved scores 0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _precision_sums(relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: sum of P@i over the relevant positions i, and the number of relevant entries.

    The j-th relevant entry of a row (1-based) sits at position p and contributes j / p.
    Working on the relevant positions only (10% of a class-balanced database) avoids a
    full cumulative sum and a full float array of precisions.
    """
    nq, n = relevant.shape
    flat = np.flatnonzero(relevant)
    rows, cols = np.divmod(flat, n)
    counts = np.bincount(rows, minlength=nq)
    # flatnonzero is row-major, so the rank of each hit within its row is its offset from the row's first hit.
    starts = np.cumsum(counts) - counts
    hits_so_far = np.arange(1, flat.size + 1) - np.repeat(starts, counts)
    sums = np.bincount(rows, weights=hits_so_far / (cols + 1), minlength=nq)
    return sums, counts


def average_precision(relevant: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Per-query AP: ``sum_i P@i * rel_i / n_relevant``, 0 where ``n_relevant == 0``.

    Given the whole ranking this is AP@all (the usual mAP of deep hashing papers when
    averaged). Given only the first k columns it is the AP@k variant normalised by all
    relevant items, which penalises relevant items beyond k; for the deep-hashing "mAP@k"
    use :func:`average_precision_at_k`.

    Args:
        relevant: (n_queries, n) bool, rank order.
        n_relevant: (n_queries,) total relevant items per query in the whole database.

    Returns:
        (n_queries,) float64.

    Raises:
        ValueError: on bad shapes, or if a row holds more relevant entries than ``n_relevant``.
    """
    relevant = _as_relevant(relevant)
    n_relevant = _as_n_relevant(n_relevant, relevant.shape[0])
    sums, counts = _precision_sums(relevant)
    if np.any(counts > n_relevant):
        raise ValueError("relevant has more relevant entries in a row than n_relevant says there are")
    return _safe_ratio(sums, n_relevant)


def average_precision_at_k(relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query AP@k in the deep-hashing convention (HashNet / DCH evaluation code).

    ``sum_{i<=k} P@i * rel_i / R_k`` where ``R_k`` is the number of relevant items in the
    top k; 0 when none is in the top k. This differs from the information-retrieval AP@k,
    which divides by ``min(k, n_relevant)``: here a query is not penalised for relevant
    items it failed to bring into the top k, only for the order within it, so the value is
    higher (equal only when the top k holds ``min(k, n_relevant)`` relevant items). Use it
    to compare with published "mAP@1000" / "mAP@5000" numbers.

    Args:
        relevant: (n_queries, n) bool, rank order, n >= k.
        k: cut-off, 1..n.

    Returns:
        (n_queries,) float64.

    Raises:
        ValueError: if ``k`` is outside ``1..n``.
    """
    relevant = _as_relevant(relevant)
    _check_k(k, relevant.shape[1])
    sums, counts = _precision_sums(relevant[:, :k])
    return _safe_ratio(sums, counts)


def precision_at_k(relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query P@k: relevant items in the top ``k`` divided by ``k``.

    Raises:
        ValueError: if ``k`` is outside ``1..n``.
    """
    relevant = _as_relevant(relevant)
    _check_k(k, relevant.shape[1])
    return np.count_nonzero(relevant[:, :k], axis=1) / np.float64(k)


def recall_at_k(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query R@k: relevant items in the top ``k`` divided by ``n_relevant`` (0 where that is 0).

    Not the product-retrieval hit rate; see :func:`hit_rate_at_k`.

    Raises:
        ValueError: if ``k`` is outside ``1..n`` or shapes disagree.
    """
    relevant = _as_relevant(relevant)
    n_relevant = _as_n_relevant(n_relevant, relevant.shape[0])
    _check_k(k, relevant.shape[1])
    return _safe_ratio(np.count_nonzero(relevant[:, :k], axis=1), n_relevant)


def _as_distance_pair(distances: np.ndarray, relevant_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    distances = np.asarray(distances)
    relevant_mask = np.asarray(relevant_mask).astype(bool, copy=False)
    if distances.ndim != 2 or distances.shape != relevant_mask.shape:
        raise ValueError(
            f"distances {distances.shape} and relevant_mask {relevant_mask.shape} must be equal 2-D shapes"
        )
    return distances, relevant_mask


def precision_within_radius(distances: np.ndarray, relevant_mask: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query precision of the Hamming ball of radius ``r`` (items at distance <= r).

    A query whose ball is empty scores 0 precision (the DCH convention for "P@H<=2"), so
    the mean is not inflated by queries that retrieve nothing; the second output says
    which queries retrieved something, so callers can report that fraction beside it.

    Args:
        distances: (n_queries, n) integer Hamming distances, database order.
        relevant_mask: (n_queries, n) bool, same order.
        r: radius, >= 0.

    Returns:
        (precision (n_queries,) float64, retrieved_any (n_queries,) bool).
    """
    distances, relevant_mask = _as_distance_pair(distances, relevant_mask)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {r}")
    within = distances <= r
    retrieved = np.count_nonzero(within, axis=1)
    hits = np.count_nonzero(within & relevant_mask, axis=1)
    return _safe_ratio(hits, retrieved), retrieved > 0


def precision_recall_by_radius(
    distances: np.ndarray, relevant_mask: np.ndarray, n_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query precision and recall of the Hamming balls of every radius 0..n_bits.

    Precision is 0 for an empty ball (as in :func:`precision_within_radius`); recall is 0
    for a query with no relevant item. One histogram of distances per query gives all
    radii at once, instead of one pass per radius.

    Args:
        distances: (n_queries, n) integer Hamming distances in 0..n_bits, database order.
        relevant_mask: (n_queries, n) bool, same order.
        n_bits: code length; radii run 0..n_bits.

    Returns:
        (precision, recall, retrieved_any), each (n_queries, n_bits + 1); column r is radius r.

    Raises:
        ValueError: if a distance lies outside 0..n_bits.
    """
    distances, relevant_mask = _as_distance_pair(distances, relevant_mask)
    nq = distances.shape[0]
    width = n_bits + 1
    if distances.size and (distances.min() < 0 or distances.max() > n_bits):
        raise ValueError(f"distances must lie in 0..{n_bits}")
    # Packing each item as the key 2*d + rel gives the histograms of all items and of
    # relevant items in one bincount per query; a per-row bincount of small (uint8) keys
    # is faster than one global bincount over row-offset int64 keys, which must be widened.
    key_dtype = np.min_scalar_type(2 * n_bits + 1)
    key = distances.astype(key_dtype) << key_dtype.type(1)
    key |= relevant_mask
    hist = np.empty((nq, 2 * width), dtype=np.int64)
    for i in range(nq):
        hist[i] = np.bincount(key[i], minlength=2 * width)
    hist = hist.reshape(nq, width, 2).cumsum(axis=1)
    hits = hist[:, :, 1]
    retrieved = hist[:, :, 0] + hits
    n_relevant = np.count_nonzero(relevant_mask, axis=1)
    return _safe_ratio(hits, retrieved), _safe_ratio(hits, n_relevant[:, None]), retrieved > 0


def pr_curve_by_radius(distances: np.ndarray, relevant_mask: np.ndarray, n_bits: int) -> dict[str, np.ndarray]:
    """Precision-recall curve of Hamming-ball lookup, radius 0..n_bits, averaged over queries.

    Per query, precision is 0 for an empty ball and recall 0 for no relevant items (see
    :func:`precision_recall_by_radius`); both are then averaged over all queries.

    Returns:
        ``{"radius": int64 (n_bits+1,), "precision": float64 (n_bits+1,), "recall": float64 (n_bits+1,)}``.
    """
    precision, recall, _ = precision_recall_by_radius(distances, relevant_mask, n_bits)
    return {
        "radius": np.arange(n_bits + 1, dtype=np.int64),
        "precision": precision.mean(axis=0) if len(precision) else np.full(n_bits + 1, np.nan),
        "recall": recall.mean(axis=0) if len(recall) else np.full(n_bits + 1, np.nan),
    }
