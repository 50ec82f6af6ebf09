"""Class-relevance metrics and exact Hamming-ranking evaluation against naive pure-Python references.

The references are written from the textbook definitions with explicit loops (AP as the
mean over relevant positions of hits-so-far / position, rankings by Python's sorted() on
(distance, id)), not from the vectorised formulas they check.
"""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_core.eval.hashing import hamming_ranking_metrics, packed_hamming_distances
from retrieval_core.eval.metrics import (
    average_precision,
    average_precision_at_k,
    pr_curve_by_radius,
    precision_at_k,
    precision_recall_by_radius,
    precision_within_radius,
    recall_at_k,
)

# ---------------------------------------------------------------- naive references


def naive_ap(rel: list[bool], n_relevant: int) -> float:
    """AP over the given list, normalised by all relevant items (0 when there are none)."""
    if n_relevant == 0:
        return 0.0
    hits, precisions = 0, []
    for position, is_relevant in enumerate(rel, start=1):
        if is_relevant:
            hits += 1
            precisions.append(hits / position)
    return sum(precisions) / n_relevant


def naive_ap_at_k(rel: list[bool], k: int) -> float:
    """Mean over the relevant positions in the top k of hits-so-far / position (0 if none)."""
    hits, precisions = 0, []
    for position in range(1, k + 1):
        if rel[position - 1]:
            hits += 1
            precisions.append(hits / position)
    return sum(precisions) / len(precisions) if precisions else 0.0


def naive_hamming(a: bytes | np.ndarray, b: bytes | np.ndarray) -> int:
    return sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b))


def naive_radius(dist_row: list[int], rel_row: list[bool], r: int) -> tuple[float, float, bool]:
    """(precision, recall, retrieved anything) of the ball of radius r, 0 for an empty ball / no relevant."""
    retrieved = [j for j in range(len(dist_row)) if dist_row[j] <= r]
    good = [j for j in retrieved if rel_row[j]]
    n_rel = sum(rel_row)
    precision = len(good) / len(retrieved) if retrieved else 0.0
    recall = len(good) / n_rel if n_rel else 0.0
    return precision, recall, bool(retrieved)


def naive_hashing(qc, ql, dc, dl, *, ks, map_at, radii, curve_ks, n_bits, tie_key=lambda j: j) -> dict:
    """Every metric of hamming_ranking_metrics by loops; ``tie_key`` orders equal distances."""
    nq, nd = len(qc), len(dc)
    rows = []
    for q in range(nq):
        dist = [naive_hamming(qc[q], dc[j]) for j in range(nd)]
        rel_db = [dl[j] == ql[q] for j in range(nd)]
        ranking = sorted(range(nd), key=lambda j: (dist[j], tie_key(j)))
        rows.append((dist, rel_db, [rel_db[j] for j in ranking], sum(rel_db)))
    out = {"map_all": sum(naive_ap(rel, n) for _, _, rel, n in rows) / nq}
    for k in map_at:
        out[f"map_at_{k}"] = sum(naive_ap_at_k(rel, k) for _, _, rel, _ in rows) / nq
    for k in ks:
        out[f"precision_at_{k}"] = sum(sum(rel[:k]) / k for _, _, rel, _ in rows) / nq
        out[f"recall_at_{k}"] = sum((sum(rel[:k]) / n if n else 0.0) for _, _, rel, n in rows) / nq
    for r in radii:
        stats = [naive_radius(dist, rel_db, r) for dist, rel_db, _, _ in rows]
        out[f"precision_r{r}"] = sum(s[0] for s in stats) / nq
        out[f"retrieved_r{r}"] = sum(s[2] for s in stats) / nq
    curve = {k: sum(sum(rel[:k]) / k for _, _, rel, _ in rows) / nq for k in curve_ks if k <= nd}
    pr = [[naive_radius(dist, rel_db, r) for dist, rel_db, _, _ in rows] for r in range(n_bits + 1)]
    out["curves"] = {
        "precision_at_k_curve": curve,
        "pr_curve": {
            "radius": list(range(n_bits + 1)),
            "precision": [sum(s[0] for s in stats) / nq for stats in pr],
            "recall": [sum(s[1] for s in stats) / nq for stats in pr],
        },
    }
    return out


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if key != "curves":
            assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["curves"]["precision_at_k_curve"] == pytest.approx(want["curves"]["precision_at_k_curve"], abs=1e-12)
    got_pr, want_pr = got["curves"]["pr_curve"], want["curves"]["pr_curve"]
    assert got_pr["radius"] == want_pr["radius"]
    assert got_pr["precision"] == pytest.approx(want_pr["precision"], abs=1e-12)
    assert got_pr["recall"] == pytest.approx(want_pr["recall"], abs=1e-12)


def random_relevance(seed: int, nq: int = 15, n: int = 30, p: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Relevance in rank order plus a total relevant count >= those shown (some beyond the list)."""
    rng = np.random.default_rng(seed)
    rel = rng.random((nq, n)) < p
    rel[0] = False  # a query with nothing relevant in the list
    n_relevant = rel.sum(axis=1) + rng.integers(0, 3, nq)
    n_relevant[0] = 0  # ... and none at all
    return rel, n_relevant


# ---------------------------------------------------------------- per-query metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranked_metrics_match_naive(seed):
    rel, n_relevant = random_relevance(seed)
    nq, n = rel.shape
    ap = average_precision(rel, n_relevant)
    assert ap.dtype == np.float64 and ap.shape == (nq,)
    assert ap.tolist() == pytest.approx([naive_ap(rel[q].tolist(), int(n_relevant[q])) for q in range(nq)])
    for k in (1, 2, 7, n):
        assert average_precision_at_k(rel, k).tolist() == pytest.approx(
            [naive_ap_at_k(rel[q].tolist(), k) for q in range(nq)]
        )
        assert precision_at_k(rel, k).tolist() == pytest.approx([sum(rel[q, :k]) / k for q in range(nq)])
        want_recall = [sum(rel[q, :k]) / n_relevant[q] if n_relevant[q] else 0.0 for q in range(nq)]
        assert recall_at_k(rel, n_relevant, k).tolist() == pytest.approx(want_recall)
    assert ap[0] == 0 and recall_at_k(rel, n_relevant, n)[0] == 0


def test_ap_at_k_divides_by_relevant_in_top_k():
    # One relevant item, at rank 1 of the top 3, four more relevant beyond: the deep-hashing
    # AP@3 is 1 (order within the top 3 is perfect); dividing by min(k, n_relevant) would give 1/3.
    rel = np.array([[True, False, False, True, True, True, True]])
    assert average_precision_at_k(rel, 3).tolist() == [1.0]
    assert average_precision(rel, np.array([5])).tolist() == pytest.approx([(1 + 2 / 4 + 3 / 5 + 4 / 6 + 5 / 7) / 5])


def test_k_out_of_range_raises():
    rel, n_relevant = random_relevance(0, n=10)
    for k in (0, 11):
        with pytest.raises(ValueError):
            precision_at_k(rel, k)
        with pytest.raises(ValueError):
            recall_at_k(rel, n_relevant, k)
        with pytest.raises(ValueError):
            average_precision_at_k(rel, k)


def test_average_precision_rejects_inconsistent_counts():
    with pytest.raises(ValueError):
        average_precision(np.array([[True, True]]), np.array([1]))


@pytest.mark.parametrize("seed", [0, 1])
def test_radius_metrics_match_naive(seed):
    rng = np.random.default_rng(seed)
    n_bits = 6
    dist = rng.integers(0, n_bits + 1, (12, 25))
    dist[0] = n_bits  # nothing within small radii: an empty ball must count as precision 0
    mask = rng.random((12, 25)) < 0.3
    mask[1] = False  # no relevant item: recall 0
    for r in range(n_bits + 1):
        precision, retrieved = precision_within_radius(dist, mask, r)
        want = [naive_radius(dist[q].tolist(), mask[q].tolist(), r) for q in range(12)]
        assert precision.tolist() == pytest.approx([w[0] for w in want])
        assert retrieved.tolist() == [w[2] for w in want]
    assert precision_within_radius(dist, mask, 2)[0][0] == 0.0
    assert not precision_within_radius(dist, mask, 2)[1][0]

    precision, recall, retrieved = precision_recall_by_radius(dist, mask, n_bits)
    curve = pr_curve_by_radius(dist, mask, n_bits)
    assert curve["radius"].tolist() == list(range(n_bits + 1))
    for r in range(n_bits + 1):
        want = [naive_radius(dist[q].tolist(), mask[q].tolist(), r) for q in range(12)]
        assert precision[:, r].tolist() == pytest.approx([w[0] for w in want])
        assert recall[:, r].tolist() == pytest.approx([w[1] for w in want])
        assert retrieved[:, r].tolist() == [w[2] for w in want]
        assert curve["precision"][r] == pytest.approx(sum(w[0] for w in want) / 12)
        assert curve["recall"][r] == pytest.approx(sum(w[1] for w in want) / 12)
    with pytest.raises(ValueError):
        pr_curve_by_radius(dist, mask, n_bits - 1)


# ---------------------------------------------------------------- Hamming distances and end to end


@pytest.mark.parametrize("n_bytes", [1, 3, 8, 9, 17, 25])
def test_packed_hamming_distances_match_naive(n_bytes):
    rng = np.random.default_rng(n_bytes)
    a = rng.integers(0, 256, (5, n_bytes), dtype=np.uint8)
    b = rng.integers(0, 256, (7, n_bytes), dtype=np.uint8)
    got = packed_hamming_distances(a, b)
    assert got.dtype == (np.uint8 if n_bytes * 8 <= 192 else np.uint16)
    assert got.tolist() == [[naive_hamming(a[i], b[j]) for j in range(7)] for i in range(5)]


def few_bit_codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    """Codes with only ``bits`` bits set at random: at most bits+1 distances, so ties everywhere."""
    return np.packbits(rng.integers(0, 2, (n, bits), dtype=np.uint8), axis=1)


@pytest.mark.parametrize(("bits", "seed", "chunk"), [(2, 0, 4), (3, 1, 5), (16, 2, 256)])
def test_hamming_ranking_metrics_match_naive(bits, seed, chunk):
    rng = np.random.default_rng(seed)
    nq, nd = 11, 60
    qc, dc = few_bit_codes(rng, nq, bits), few_bit_codes(rng, nd, bits)
    ql, dl = rng.integers(0, 4, nq), rng.integers(0, 3, nd)
    ql[0] = 7  # a class absent from the database: AP 0, recall 0
    kwargs = {"ks": (1, 5, nd), "map_at": (5, 20), "radii": (0, 1, bits), "curve_ks": (1, 10, 50, 1000)}
    got = hamming_ranking_metrics(qc, ql, dc, dl, chunk=chunk, n_bits=bits, **kwargs)
    assert_metrics_close(got, naive_hashing(qc, ql, dc, dl, n_bits=bits, **kwargs))
    assert list(got["curves"]["precision_at_k_curve"]) == [1, 10, 50]  # k > n dropped from the curve
    repeated = hamming_ranking_metrics(qc, ql, dc, dl, chunk=chunk, n_bits=bits, ks=(5, 5), map_at=(5, 5), radii=(1, 1))
    assert repeated["precision_at_5"] == got["precision_at_5"] and repeated["map_at_5"] == got["map_at_5"]
    assert repeated["precision_r1"] == got["precision_r1"]


def test_tie_break_by_database_id_is_pinned():
    # Every database item ties at distance 0; only item 0 is relevant. Ascending ids put it
    # first (AP 1); reversed ids would put it last (AP 1/4).
    qc = np.zeros((1, 1), np.uint8)
    dc = np.zeros((4, 1), np.uint8)
    ql, dl = np.array([1]), np.array([1, 0, 0, 0])
    got = hamming_ranking_metrics(qc, ql, dc, dl, ks=(1,), map_at=(2,), radii=(0,), curve_ks=())
    assert got["map_all"] == 1.0 and got["precision_at_1"] == 1.0
    common = {"ks": (1,), "map_at": (2,), "radii": (0,), "curve_ks": (), "n_bits": 8}
    reversed_ids = naive_hashing(qc, ql, dc, dl, tie_key=lambda j: -j, **common)
    assert reversed_ids["map_all"] == 0.25

    # On random 2-bit codes the rule changes mAP too, and ours is the ascending-id one.
    rng = np.random.default_rng(3)
    qc, dc = few_bit_codes(rng, 8, 2), few_bit_codes(rng, 40, 2)
    ql, dl = rng.integers(0, 3, 8), rng.integers(0, 3, 40)
    common = {"ks": (5,), "map_at": (5,), "radii": (0,), "curve_ks": (), "n_bits": 2}
    got = hamming_ranking_metrics(qc, ql, dc, dl, **common)
    ascending = naive_hashing(qc, ql, dc, dl, **common)
    descending = naive_hashing(qc, ql, dc, dl, tie_key=lambda j: -j, **common)
    assert got["map_all"] == pytest.approx(ascending["map_all"])
    assert abs(ascending["map_all"] - descending["map_all"]) > 1e-3


def test_hamming_ranking_metrics_edge_cases():
    rng = np.random.default_rng(4)
    qc, dc = few_bit_codes(rng, 3, 16), few_bit_codes(rng, 10, 16)
    ql, dl = np.array(["a", "b", "z"]), np.array(list("ababababab"))  # any labels; "z" has no relevant item
    with pytest.raises(ValueError):
        hamming_ranking_metrics(qc, ql, dc, dl, ks=(11,))
    with pytest.raises(ValueError):
        hamming_ranking_metrics(qc, ql, dc, dl, map_at=(0,))
    with pytest.raises(ValueError):
        hamming_ranking_metrics(qc, ql, dc, dl, radii=(17,))
    with pytest.raises(ValueError):
        hamming_ranking_metrics(qc, ql, dc[:, :1], dl)

    # A query whose code is at distance 16 from every database item retrieves nothing at radius 2.
    far = np.packbits(np.ones((1, 16), np.uint8), axis=1)
    db = np.zeros((4, 2), np.uint8)
    got = hamming_ranking_metrics(far, np.array([0]), db, np.zeros(4, int), ks=(1,), map_at=(1,), curve_ks=())
    assert got["precision_r2"] == 0.0 and got["retrieved_r2"] == 0.0
    assert got["map_all"] == 1.0  # ranking still finds them all
