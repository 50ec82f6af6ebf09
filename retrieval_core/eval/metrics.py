"""Retrieval metrics shared by every evaluation.

Conventions: ``ranked`` is an (n_queries, k) array of gallery labels in rank
order (best first; ties already broken by the caller, by id), with ``-1`` for
empty slots; ``targets`` holds each query's relevant label.
"""

from __future__ import annotations

import numpy as np


def recall_at_k(ranked: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of queries whose target label appears in the first ``k`` results."""
    ranked = np.asarray(ranked)
    if ranked.shape[0] == 0:
        return float("nan")
    if k > ranked.shape[1]:
        raise ValueError(f"k={k} exceeds the {ranked.shape[1]} results per query")
    hits = (ranked[:, :k] == np.asarray(targets)[:, None]).any(axis=1)
    return float(hits.mean())
