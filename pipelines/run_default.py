"""``make index``: the main job on the embedded default catalog, from nothing.

1. generate the synthetic garment catalog (cached),
2. train the baseline bundle unless one is cached,
3. run the indexing pipeline on the local runner,
4. open the published generation and measure consumer-view -> shop-view recall@1/@10 on it,
   using the index itself (shop views as the allowed gallery), for embeddings and Hamming codes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import numpy as np

from pipelines.index_catalog import run as run_pipeline
from retrieval_core import io as rio
from retrieval_core.bundle import CONFIG_FILE
from retrieval_core.data.synthetic import SyntheticConfig, generate_catalog
from retrieval_core.eval.metrics import hit_rate_at_k
from retrieval_core.search import Searcher

LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts", help="where catalog, bundle and output go")
    p.add_argument("--products_per_category", type=int, default=100)
    p.add_argument("--consumer_views", type=int, default=2)
    p.add_argument("--num_shards", type=int, default=4)
    p.add_argument("--runner", default=LOCAL_RUNNER)
    p.add_argument("--retrain", action="store_true", help="train the bundle even if one is cached")
    return p


def evaluate_index(output: str, bundle_dir: str, catalog_csv: str, ks=(1, 10)) -> dict:
    """Recall@k of every indexed consumer view against the indexed shop views, searched in the index."""
    with open(catalog_csv, newline="") as f:
        rows = {r["item_id"]: r for r in csv.DictReader(f)}
    searcher = Searcher.open(output, bundle=bundle_dir)
    indexed = searcher.item_ids.to_pylist()
    shop_ids = np.array([i for i, item in enumerate(indexed) if rows[item]["view"] == "shop"], np.int64)
    queries = [item for item in indexed if rows[item]["view"] == "consumer"]
    targets = np.array([rows[q]["product_id"] for q in queries])
    emb, codes = searcher.features_of(queries)
    out = {"queries": len(queries), "gallery": int(len(shop_ids))}
    for mode, result in (
        ("vector", searcher.search_vectors(emb, max(ks), allowed_ids=shop_ids)),
        ("hamming", searcher.search_codes(codes, max(ks), allowed_ids=shop_ids)),
    ):
        ranked = np.array([[rows[i]["product_id"] if i else "" for i in r] for r in result.item_ids])
        for k in ks:
            out[f"{mode}_recall_at_{k}"] = round(hit_rate_at_k(ranked, targets, k), 4)
    out["example_query"] = queries[0] if queries else None
    return out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.time()
    art = args.artifacts
    catalog = generate_catalog(
        os.path.join(art, "catalog"),
        SyntheticConfig(products_per_category=args.products_per_category, consumer_views=args.consumer_views, seed=0),
        progress=True,
    )
    print(f"catalog: {catalog}")

    bundle_dir = os.path.join(art, "bundles", "baseline")
    if args.retrain or not rio.exists(os.path.join(bundle_dir, CONFIG_FILE)):
        from retrieval_core.train.baseline import TrainConfig
        from retrieval_core.train.baseline import main as train

        train(TrainConfig(out=bundle_dir, data=os.path.join(art, "train_catalog")))
    else:
        print(f"bundle: cached at {bundle_dir} (make train-baseline to retrain)")

    output = os.path.join(art, "output")
    report = run_pipeline(
        [
            f"--catalog={catalog}",
            f"--output={output}",
            f"--bundle={bundle_dir}",
            f"--runner={args.runner}",
            f"--num_shards={args.num_shards}",
        ]
    )
    evaluation = evaluate_index(output, bundle_dir, str(catalog))
    with open(os.path.join(art, "index_report.json"), "w") as f:
        json.dump({"run": report, "evaluation": evaluation}, f, indent=2, default=str)

    c = report["counts"]
    gen_dir = os.path.join(output, "indices", report["generation"])
    print("\n== make index: done in %.0f s ==" % (time.time() - started))
    print(f"catalog rows     {c['catalog_rows']}  ->  indexed {c['indexed']}, dead-letter {c['dead_letter']}")
    print(
        f"{report['mode']:16s} new {c['new']}, changed {c['changed']}, unchanged {c['unchanged']} (not re-embedded), "
        f"removed {c['removed']}"
    )
    print(f"features         {output}/features/run={report['run_id']}/")
    print(f"dead letter      {output}/dead_letter/run={report['run_id']}/")
    print(
        f"index            {gen_dir}/  ({report['index']['vector_factory']} + "
        f"{report['index']['binary_factory']}, {args.num_shards} shards)"
    )
    print(f"published        {output}/CURRENT -> {report['generation']}")
    print(f"run report       {output}/runs/{report['run_id']}.json")
    print(f"recall (consumer view -> shop view, {evaluation['queries']} queries, {evaluation['gallery']} shop views):")
    for mode in ("vector", "hamming"):
        print(
            f"  {mode:8s} recall@1 {evaluation[f'{mode}_recall_at_1']:.3f}   "
            f"recall@10 {evaluation[f'{mode}_recall_at_10']:.3f}"
        )
    if evaluation["example_query"]:
        print(f"try: .venv/bin/retrieval-search --index {output} --item {evaluation['example_query']} --k 5")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
