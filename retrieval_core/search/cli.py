"""``retrieval-search``: query a published index from the shell.

Examples::

    retrieval-search --index artifacts/output --item p000012-c1 --k 5
    retrieval-search --index artifacts/output --image photo.jpg --bundle artifacts/bundles/baseline --json
    retrieval-search --index artifacts/output --item p000012-c1 --mode hamming
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from retrieval_core.search.searcher import Searcher, SearchResult, default_output_root


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
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip sha256 verification")
    return p


def format_table(queries: list[str], result: SearchResult) -> str:
    lines = []
    for qi, query in enumerate(queries):
        lines.append(f"query {query}  ({result.metric})")
        lines.append(f"  {'rank':>4}  {'score':>9}  {'faiss_id':>9}  item_id")
        for row in result.rows(qi):
            score = f"{row['score']:.4f}" if result.metric != "hamming" else f"{int(row['score'])}"
            lines.append(f"  {row['rank']:>4}  {score:>9}  {row['faiss_id']:>9}  {row['item_id']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    searcher = Searcher.open(args.index, args.generation, bundle=args.bundle, verify=args.verify)
    if args.item:
        queries, result = args.item, searcher.search_items(args.item, args.k, mode=args.mode)
    elif args.image:
        queries, result = args.image, searcher.search_images(args.image, args.k, mode=args.mode)
    else:
        arr = np.load(args.vector)
        queries = [f"{args.vector}[{i}]" for i in range(len(np.atleast_2d(arr)))]
        result = searcher.search_codes(arr, args.k) if args.mode == "hamming" else searcher.search_vectors(arr, args.k)
    if args.json:
        out = {
            "generation": searcher.manifest.generation,
            "model_id": searcher.manifest.model_id,
            "metric": result.metric,
            "results": [{"query": q, "neighbours": result.rows(i)} for i, q in enumerate(queries)],
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"generation {searcher.manifest.generation}  model {searcher.manifest.model_id}  {searcher.ntotal} items")
        print(format_table(queries, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
