"""Consumer-to-shop retrieval evaluation by brute force (the oracle the indices are checked against)."""

from __future__ import annotations

import numpy as np

from retrieval_core.eval.metrics import hit_rate_at_k


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
