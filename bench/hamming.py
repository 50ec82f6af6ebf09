"""``make bench-hamming``: Hamming k-NN and radius-2 search, multi-index hashing vs an exhaustive scan.

1,000,000 64-bit codes (``--quick``: 100,000) drawn the way a semantic hash
spreads a catalog: 2,000 cluster centres (products of a kind) with each bit
flipped with probability 3% (views of one product), so close neighbours exist,
as they do for learned codes. Queries: 1,000 codes of the database (each finds
at least itself) and 1,000 fresh codes from the same centres.

The index under test is what the pipeline chooses for such a generation
(``hamming.choose_binary_factory``: ``BHash3x21``), searched through
``retrieval_core.index.hamming`` exactly as the Searcher does; the baseline is
``IndexBinaryFlat`` in the same process. Every answer is checked against the
baseline's: the benchmark fails rather than report a speed-up of a wrong
answer. Writes ``bench/results/hamming.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse

import faiss
import numpy as np

from bench.common import commit, machine, timed, write_rows
from retrieval_core.index import hamming

BITS = 64


def catalog_codes(n: int, seed: int, centres: int = 2000, flip: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """(n codes, the centres they were drawn from), packed (n, 8) uint8."""
    rng = np.random.default_rng(seed)
    centre_bits = rng.integers(0, 2, (centres, BITS), dtype=np.uint8)
    return _noisy(centre_bits, n, rng, flip), centre_bits


def _noisy(centre_bits: np.ndarray, n: int, rng: np.random.Generator, flip: float) -> np.ndarray:
    out = np.empty((n, BITS // 8), np.uint8)
    for start in range(0, n, 100_000):  # bounded memory: 100k x 64 bools at a time
        m = min(100_000, n - start)
        bits = centre_bits[rng.integers(0, len(centre_bits), m)] ^ (rng.random((m, BITS)) < flip)
        out[start : start + m] = np.packbits(bits.astype(np.uint8), axis=1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codes", type=int, default=1_000_000, help="database size")
    p.add_argument("--queries", type=int, default=1000, help="queries of each kind (in the database / fresh)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--radius", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="100,000 codes (CI smoke size)")
    p.add_argument("--out", default=None, help="default: bench/results/hamming.json")
    args = p.parse_args(argv)
    n = 100_000 if args.quick else args.codes
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())

    codes, centres = catalog_codes(n, seed=0)
    rng = np.random.default_rng(1)
    queries = np.concatenate(
        [codes[rng.choice(n, args.queries, replace=False)], _noisy(centres, args.queries, rng, 0.03)]
    )
    factory = hamming.choose_binary_factory(max(n, hamming.HASH_MIN_ROWS), BITS)

    flat = faiss.index_binary_factory(BITS, "BFlat")
    flat_build_s, _ = timed(lambda: flat.add(codes), repeats=1)
    hashed = faiss.index_binary_factory(BITS, factory)
    hash_build_s, _ = timed(lambda: hashed.add(codes), repeats=1)
    index_bytes = {
        "BFlat": len(faiss.serialize_index_binary(flat)),
        factory: len(faiss.serialize_index_binary(hashed)),
    }

    flat_range_s, flat_range = timed(lambda: hamming.range_search(flat, queries, args.radius))
    hash_range_s, hash_range = timed(lambda: hamming.range_search(hashed, queries, args.radius))
    range_identical = all(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(flat_range, hash_range, strict=True)
    )
    flat_knn_s, flat_knn = timed(lambda: hamming.knn(flat, queries, args.k))
    hash_knn_s, hash_knn = timed(lambda: hamming.knn(hashed, queries, args.k))
    knn_identical = np.array_equal(flat_knn[0], hash_knn[0]) and np.array_equal(flat_knn[1], hash_knn[1])
    lims = hashed.range_search(queries, hamming.exact_radius(hashed) + 1)[0]
    from_tables = float(np.mean(np.diff(lims) >= args.k))
    if not (range_identical and knn_identical):
        raise SystemExit(f"{factory} disagrees with IndexBinaryFlat (range {range_identical}, knn {knn_identical})")

    nq = len(queries)
    common = {
        "dataset": "synthetic-codes",
        "codes": n,
        "bits": BITS,
        "queries": nq,
        "machine": machine(),
        "commit": commit(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    rows = []
    for method, build_s, range_s, knn_s in (
        ("BFlat", flat_build_s, flat_range_s, flat_knn_s),
        (factory, hash_build_s, hash_range_s, hash_knn_s),
    ):
        rows.append(
            {
                "method": method,
                **common,
                "build_s": round(build_s, 3),
                "index_mb": round(index_bytes[method] / 2**20, 1),
                f"radius{args.radius}_ms_per_query": round(1000 * range_s / nq, 4),
                f"radius{args.radius}_speedup": round(flat_range_s / range_s, 1),
                f"radius{args.radius}_identical_to_flat": range_identical,
                f"knn{args.k}_ms_per_query": round(1000 * knn_s / nq, 4),
                f"knn{args.k}_speedup": round(flat_knn_s / knn_s, 1),
                f"knn{args.k}_identical_to_flat": knn_identical,
                f"knn{args.k}_answered_from_tables": round(from_tables, 3) if method == factory else 0.0,
                "mean_results_within_radius": round(float(np.mean([len(r[1]) for r in flat_range])), 2),
            }
        )
    out = write_rows("hamming", rows, args.out)
    r, k = args.radius, args.k
    print(f"| index | build s | MB | radius-{r} ms/query | speed-up | k={k} ms/query | speed-up | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['build_s']} | {row['index_mb']} | {row[f'radius{r}_ms_per_query']} | "
            f"{row[f'radius{r}_speedup']}x | {row[f'knn{k}_ms_per_query']} | {row[f'knn{k}_speedup']}x | "
            f"{range_identical and knn_identical} |"
        )
    print(f"{from_tables:.1%} of k-NN queries answered from the hash tables; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
