"""Consumer-to-shop retrieval evaluation by brute force (the oracle the indices are checked against)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from retrieval_core.embedding_transform import l2_normalise
from retrieval_core.eval.metrics import average_precision, average_precision_at_k, hit_rate_at_k, precision_at_k


def hamming_distances(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """(nq, B) x (nd, B) packed uint8 codes -> (nq, nd) Hamming distances, by numpy popcount."""
    x = np.bitwise_xor(query_codes[:, None, :], db_codes[None, :, :])
    return np.unpackbits(x, axis=2).sum(axis=2, dtype=np.int64)


def rank_by_score(scores: np.ndarray, k: int, higher_is_better: bool = True) -> np.ndarray:
    """Top-k column indices per row, ties broken by the lower index (stable sort)."""
    order = np.argsort(-scores if higher_is_better else scores, axis=1, kind="stable")
    return order[:, :k]


def consumer_to_shop_recall(
    embeddings: np.ndarray, codes: np.ndarray, product_ids: np.ndarray, views: np.ndarray, ks: tuple[int, ...] = (1, 10)
) -> dict[str, float]:
    """Recall@k of consumer views against the gallery of shop views (hit = same product).

    Returns keys ``recall_at_<k>`` (embeddings, cosine) and ``hamming_recall_at_<k>`` (codes).
    """
    query = views == "consumer"
    gallery = views == "shop"
    targets = product_ids[query]
    gallery_products = product_ids[gallery]
    kmax = min(max(ks), int(gallery.sum()))
    sims = embeddings[query] @ embeddings[gallery].T
    ranked = gallery_products[rank_by_score(sims, kmax)]
    dist = hamming_distances(codes[query], codes[gallery])
    ranked_h = gallery_products[rank_by_score(dist, kmax, higher_is_better=False)]
    out = {}
    for k in ks:
        kk = min(k, kmax)
        out[f"recall_at_{k}"] = hit_rate_at_k(ranked, targets, kk)
        out[f"hamming_recall_at_{k}"] = hit_rate_at_k(ranked_h, targets, kk)
    return out


def _rows(a: np.ndarray, normalise: bool) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected (N, D) embeddings, got shape {a.shape}")
    return l2_normalise(a, np.float64) if normalise else a


def cosine_rankings(
    query_emb: np.ndarray, gallery_emb: np.ndarray, chunk: int = 256, normalise: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Full cosine rankings of the gallery, ``chunk`` queries at a time.

    Similarities are computed in float64 on L2-normalised rows (or the rows as given); ties go to the lower
    gallery index (stable sort), so the order is reproducible and the caller decides what the gallery order means.

    Args:
        query_emb, gallery_emb: ``(Q, D)`` and ``(G, D)`` embeddings.
        chunk: queries ranked at a time.
        normalise: False: rank by the inner products of the rows as given, as an inner-product index
            searches them. For features that are already what a bundle serves (unit rows): a served row that
            is not unit then shows in the ranking instead of being repaired here.

    Yields:
        ``(start, order)``: ``order`` is ``(n, G)`` int64 gallery indices, best first, of queries
        ``start .. start + n - 1``.
    """
    q, g = _rows(query_emb, normalise), _rows(gallery_emb, normalise)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"embedding sizes differ: queries {q.shape[1]}, gallery {g.shape[1]}")
    for start in range(0, len(q), chunk):
        yield start, np.argsort(-(q[start : start + chunk] @ g.T), axis=1, kind="stable")


def product_retrieval_metrics(
    query_emb: np.ndarray,
    query_products: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_products: np.ndarray,
    ks: tuple[int, ...] = (1, 10, 20),
    query_categories: np.ndarray | None = None,
    gallery_categories: np.ndarray | None = None,
    category_map_at: tuple[int, ...] = (100,),
    chunk: int = 256,
    normalise: bool = True,
) -> dict[str, float]:
    """Product retrieval by brute-force cosine ranking: R@k (hit rate), mAP, and category-level mAP@k.

    A gallery item is relevant when its product is the query's; a query whose product is not in the gallery
    counts as a miss with AP 0. Ties in score go to the lower gallery index.

    Args:
        query_emb: ``(Q, D)`` query embeddings (normalised here unless ``normalise`` is False).
        query_products: ``(Q,)`` each query's product.
        gallery_emb: ``(G, D)`` gallery embeddings.
        gallery_products: ``(G,)`` each gallery item's product.
        ks: cut-offs of the hit rate (``recall_at_<k>``, what product-retrieval papers call R@k).
        query_categories: ``(Q,)`` categories, for the category-level metric; None: not computed.
        gallery_categories: ``(G,)`` categories.
        category_map_at: cut-offs of ``category_map_at_<k>``: AP@k with relevant = same category, in the
            deep-hashing convention of :func:`~retrieval_core.eval.metrics.average_precision_at_k`.
        chunk: queries ranked at a time.
        normalise: see :func:`cosine_rankings` (False: rank served features by their inner products).

    Returns:
        ``recall_at_<k>``, ``map_all`` (AP over the whole ranking; with one relevant item it is the mean
        reciprocal rank of the hit) and ``category_map_at_<k>``; cut-offs larger than the gallery are left
        out. NaN values for no queries.
    """
    query_products, gallery_products = np.asarray(query_products), np.asarray(gallery_products)
    if len(query_products) != len(query_emb) or len(gallery_products) != len(gallery_emb):
        raise ValueError("need one product per query and per gallery item")
    if len(gallery_products) == 0:
        raise ValueError("the gallery is empty")
    with_categories = query_categories is not None and gallery_categories is not None
    n_gallery = len(gallery_products)
    ks = tuple(k for k in ks if k <= n_gallery)
    cat_ks = tuple(k for k in category_map_at if k <= n_gallery) if with_categories else ()
    products, counts = np.unique(gallery_products, return_counts=True)
    where = np.searchsorted(products, query_products).clip(max=len(products) - 1)
    n_relevant = np.where(products[where] == query_products, counts[where], 0)
    hits = {k: 0.0 for k in ks}
    ap = np.zeros(len(query_products))
    cat_ap = {k: np.zeros(len(query_products)) for k in cat_ks}
    for start, order in cosine_rankings(query_emb, gallery_emb, chunk, normalise):
        rows = slice(start, start + len(order))
        ranked = gallery_products[order]
        for k in ks:
            hits[k] += hit_rate_at_k(ranked[:, :k], query_products[rows], k) * len(order)
        ap[rows] = average_precision(ranked == query_products[rows, None], n_relevant[rows])
        for k in cat_ks:
            relevant = np.asarray(gallery_categories)[order[:, :k]] == np.asarray(query_categories)[rows, None]
            cat_ap[k][rows] = average_precision_at_k(relevant, k)
    n = len(query_products)
    nan = float("nan")
    out = {f"recall_at_{k}": hits[k] / n if n else nan for k in ks}
    out["map_all"] = float(ap.mean()) if n else nan
    out.update({f"category_map_at_{k}": float(cat_ap[k].mean()) if n else nan for k in cat_ks})
    return out


def category_retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    map_at: tuple[int, ...] = (100,),
    precision_at: tuple[int, ...] = (10,),
    chunk: int = 256,
    normalise: bool = True,
) -> dict[str, float]:
    """Category-level retrieval by brute-force cosine ranking: relevant = same label (e.g. consumer-to-shop).

    Args:
        query_emb, gallery_emb: ``(Q, D)`` and ``(G, D)`` embeddings (normalised here unless ``normalise`` is False).
        query_labels, gallery_labels: ``(Q,)`` and ``(G,)`` labels; a gallery label no query has (e.g. -1 for
            "no class") is never relevant.
        map_at: cut-offs of ``map_at_<k>``: AP@k in the deep-hashing convention of
            :func:`~retrieval_core.eval.metrics.average_precision_at_k`.
        precision_at: cut-offs of ``precision_at_<k>``.
        chunk: queries ranked at a time.
        normalise: see :func:`cosine_rankings` (False: rank served features by their inner products).

    Returns:
        The metrics averaged over queries; cut-offs larger than the gallery are left out.

    Raises:
        ValueError: not one label per query and per gallery item, or an empty gallery.
    """
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(query_labels) != len(query_emb) or len(gallery_labels) != len(gallery_emb):
        raise ValueError("need one label per query and per gallery item")
    if len(gallery_labels) == 0:
        raise ValueError("the gallery is empty")
    n_gallery = len(gallery_labels)
    map_at = tuple(k for k in map_at if k <= n_gallery)
    precision_at = tuple(k for k in precision_at if k <= n_gallery)
    kmax = max(map_at + precision_at, default=0)
    per_query = {f"map_at_{k}": np.zeros(len(query_labels)) for k in map_at}
    per_query.update({f"precision_at_{k}": np.zeros(len(query_labels)) for k in precision_at})
    for start, order in cosine_rankings(query_emb, gallery_emb, chunk, normalise):
        rows = slice(start, start + len(order))
        relevant = gallery_labels[order[:, :kmax]] == query_labels[rows, None]
        for k in map_at:
            per_query[f"map_at_{k}"][rows] = average_precision_at_k(relevant, k)
        for k in precision_at:
            per_query[f"precision_at_{k}"][rows] = precision_at_k(relevant, k)
    return {name: float(v.mean()) if len(v) else float("nan") for name, v in per_query.items()}
