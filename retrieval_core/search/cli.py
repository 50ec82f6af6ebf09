"""``retrieval-search``: query a published index from the shell.

Examples::

    retrieval-search --index artifacts/output --item p000012-c1 --k 5
    retrieval-search --index artifacts/output --image photo.jpg --bundle artifacts/bundles/baseline --json
    retrieval-search --index artifacts/output --item p000012-c1 --mode hamming
    retrieval-search --index artifacts/output --item p000012-c1 --radius 2
    retrieval-search --index artifacts/output --vector queries.npy --nprobe 64
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from retrieval_core.search.searcher import Searcher, default_output_root


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retrieval-search",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--index", default=default_output_root(), help="output root of the indexing pipeline")
    p.add_argument("--generation", default=None, help="a generation name (default: the one CURRENT names)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--item", action="append", help="query by an indexed item_id (repeatable)")
    q.add_argument("--image", action="append", help="query by an image file or URI (repeatable); needs --bundle")
    q.add_argument(
        "--vector",
        help="query by a .npy file of (n, dim) float32 embeddings, or (n, bits/8) uint8 codes with --mode hamming",
    )
    p.add_argument("--bundle", default=None, help="model bundle directory (for --image); must match the index")
    p.add_argument("--mode", choices=("vector", "hamming"), default="vector", help="embedding or Hamming k-NN")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument(
        "--radius",
        type=int,
        default=None,
        help="instead of k-NN: every item whose code is within this Hamming distance (inclusive; implies --mode "
        "hamming), sorted by distance then item id",
    )
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the manifest's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip sha256 verification")
    return p


def format_table(queries: list[str], rows: list[list[dict]], metric: str) -> str:
    lines = []
    for query, found in zip(queries, rows):
        lines.append(f"query {query}  ({metric}, {len(found)} results)")
        lines.append(f"  {'rank':>4}  {'score':>9}  {'faiss_id':>9}  item_id")
        for row in found:
            score = f"{row['score']:.4f}" if metric != "hamming" else f"{int(row['score'])}"
            lines.append(f"  {row['rank']:>4}  {score:>9}  {row.get('faiss_id', ''):>9}  {row['item_id']}")
    return "\n".join(lines)


def query_codes(searcher: Searcher, args: argparse.Namespace) -> tuple[list[str], np.ndarray]:
    """Query names and their packed codes, from items, images or a .npy file of codes."""
    if args.item:
        return args.item, searcher.features_of(args.item)[1]
    if args.image:
        return args.image, searcher.encode_images(args.image).codes
    codes = np.atleast_2d(np.load(args.vector))
    return [f"{args.vector}[{i}]" for i in range(len(codes))], codes


def within_radius(searcher: Searcher, args: argparse.Namespace) -> tuple[list[str], list[list[dict]]]:
    queries, codes = query_codes(searcher, args)
    found = searcher.search_codes_within(codes, args.radius)
    rows = [
        [{"rank": r + 1, "item_id": item, "score": int(d)} for r, (item, d) in enumerate(zip(items, dist))]
        for items, dist in found
    ]
    return queries, rows


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.radius is not None and args.radius < 0:
        print("error: --radius must be >= 0", file=sys.stderr)
        return 2
    searcher = Searcher.open(args.index, args.generation, bundle=args.bundle, verify=args.verify)
    if args.radius is not None:
        queries, rows = within_radius(searcher, args)
        print_results(searcher, queries, rows, "hamming", args.json)
        return 0
    if args.item:
        queries, result = args.item, searcher.search_items(args.item, args.k, mode=args.mode)
    elif args.image:
        queries, result = args.image, searcher.search_images(args.image, args.k, mode=args.mode)
    else:
        arr = np.load(args.vector)
        queries = [f"{args.vector}[{i}]" for i in range(len(np.atleast_2d(arr)))]
        if args.mode == "hamming":
            result = searcher.search_codes(arr, args.k)
        else:
            result = searcher.search_vectors(arr, args.k, nprobe=args.nprobe)
    print_results(searcher, queries, [result.rows(i) for i in range(len(queries))], result.metric, args.json)
    return 0


def print_results(searcher: Searcher, queries: list[str], rows: list[list[dict]], metric: str, as_json: bool) -> None:
    if as_json:
        out = {
            "generation": searcher.manifest.generation,
            "model_id": searcher.manifest.model_id,
            "metric": metric,
            "results": [{"query": q, "neighbours": r} for q, r in zip(queries, rows)],
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"generation {searcher.manifest.generation}  model {searcher.manifest.model_id}  {searcher.ntotal} items")
        print(format_table(queries, rows, metric))


if __name__ == "__main__":
    sys.exit(main())
