"""``make bench-hashing``: ADSH against DCH, ITQ and LSH codes on real data, at 16, 32, 48 and 64 bits.

For each dataset (``retrieval_core.train.hashing`` has the protocols; relevant = same class):

- ``adsh`` and ``dch``: one network trained per bit length, with and without the adversary, everything
  else equal (same data, seed, epochs, losses and weights);
- ``itq`` and ``lsh``: codes of the float embeddings of the same network trained without the hashing losses
  (category cross-entropy and the embedding's supervised contrastive loss only; one run per dataset, shared
  by every bit length), fitted on the database embeddings.

Every method's codes are ranked by Hamming distance with ties broken by database id
(``retrieval_core.eval.hashing``), so the numbers are comparable and reproducible. Rows: mAP@all, mAP@1000,
precision within radius 2 (0 for a query that retrieves nothing), precision@100, and wall times of training
and encoding; the precision@k and precision-recall (by radius) curves go to ``hashing-curves.json``. Writes
``bench/results/hashing.json`` (after each dataset, so a later failure keeps the earlier datasets) and the
table in ``docs/results.md``. A dataset that is not on this machine is skipped, saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time

from bench.common import RESULTS_DIR, commit, machine, write_rows
from retrieval_core.data import fashion_mnist, real_photos
from retrieval_core.models.projection_hashing import ITQ, LSH
from retrieval_core.train import hashing

BITS = (16, 32, 48, 64)
METHODS = ("adsh", "dch", "itq", "lsh")
METRICS = ("map_all", "map_at_1000", "precision_r2", "retrieved_r2", "precision_at_100", "top1_acc")
DOC = os.path.join("docs", "results.md")
BEGIN, END = "<!-- bench-hashing:begin -->", "<!-- bench-hashing:end -->"

# Epochs per dataset, chosen so that every training run takes under 15 minutes on 2 CPU cores and the
# whole benchmark about two hours (Fashion-MNIST about 1 min an epoch, the product photos about 1.3).
EPOCHS = {"fashion-mnist": 6, "clothing-small": 15, "fashion-product-small": 3}
# Model input side: the product photos are 60 x 80, so 48 px loses little and costs half of 64 px.
IMAGE_SIZE = {"fashion-mnist": 28, "clothing-small": 64, "fashion-product-small": 48}
# --quick: small seeded slices (database, queries) and one or two epochs; the whole run takes minutes.
QUICK = {"limit_train": 1024, "limit_query": 256}
QUICK_EPOCHS = {"fashion-mnist": 2, "clothing-small": 1, "fashion-product-small": 1}


def available(dataset: str, data_dir: str | None) -> str | None:
    """None when ``dataset`` can be read here, else why not."""
    folder = os.path.join(data_dir, dataset) if data_dir else None
    try:
        if dataset == "fashion-mnist":
            hashing.fashion_mnist_dir(data_dir or "")
        elif dataset == "clothing-small":
            real_photos.clothing_small("validation", folder)
        else:
            real_photos.fashion_product_split(data_dir=folder)
    except (fashion_mnist.FashionMNISTError, FileNotFoundError, ValueError) as e:
        return str(e)
    return None


def _row(method: str, cfg: hashing.HashingConfig, data: hashing.HashingData, bits: int, metrics: dict, **extra):
    """One result row (CONVENTIONS.md shape); the metrics' curves go under ``_curves`` (split off before writing)."""
    return {
        "_curves": metrics["curves"],
        "method": method,
        "dataset": data.dataset,
        "protocol": data.protocol,
        "bits": bits,
        **{k: round(float(metrics[k]), 4) for k in METRICS if k in metrics},
        **extra,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "database_size": int(len(data.db_labels)),
        "query_size": int(len(data.query_labels)),
    }


def _show(row: dict) -> None:
    print(json.dumps({k: v for k, v in row.items() if k != "_curves"}))


def projection_rows(backbone: hashing.HashingRun, cfg, data, bits_list) -> list[dict]:
    """LSH and ITQ at every bit length on the backbone's float embeddings (fitted on the database)."""
    rows = []
    for bits in bits_list:
        for method, hasher in (("lsh", LSH(bits, seed=cfg.seed)), ("itq", ITQ(bits, seed=cfg.seed))):
            started = time.perf_counter()
            hasher.fit(backbone.db["embeddings"])
            fit_s = time.perf_counter() - started
            started = time.perf_counter()
            db_codes, query_codes = (
                hasher.encode(backbone.db["embeddings"]),
                hasher.encode(backbone.queries["embeddings"]),
            )
            project_s = time.perf_counter() - started
            metrics = hashing.protocol_metrics(query_codes, data.query_labels, db_codes, data.db_labels)
            rows.append(
                _row(
                    method,
                    cfg,
                    data,
                    bits,
                    metrics,
                    # The backbone is trained once for every bit length; its time is counted in each row.
                    train_s=round(backbone.train_s + fit_s, 1),
                    encode_s=round(backbone.encode_s + project_s, 2),
                )
            )
            _show(rows[-1])
    return rows


def run_dataset(dataset: str, args, artifacts: str) -> list[dict]:
    slices = {k: QUICK[k] if args.quick else 0 for k in QUICK}  # 0: everything
    slices.update({k: getattr(args, k) for k in QUICK if getattr(args, k) is not None})
    base = hashing.HashingConfig(
        dataset=dataset,
        data_dir=args.data_dir or "",
        cache_dir=os.path.join(artifacts, "cache"),
        image_size=IMAGE_SIZE[dataset],
        epochs=args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)[dataset],
        seed=args.seed,
        threads=args.threads,
        **slices,
    )
    started = time.perf_counter()
    data = hashing.load_data(base)
    print(
        f"{dataset}: {len(data.db_labels)} database, {len(data.query_labels)} queries, {len(data.classes)} classes "
        f"(loaded in {time.perf_counter() - started:.0f} s)"
    )
    bundles = os.path.join(artifacts, "bench", "hashing", dataset)
    backbone_cfg = dataclasses.replace(
        base, out=os.path.join(bundles, "classifier"), no_adversary=True, w_cauchy=0.0, quant_lambda=0.0
    )
    rows = []
    if {"itq", "lsh"} & set(args.methods):
        rows = projection_rows(hashing.main(backbone_cfg, data), base, data, args.bits)
        rows = [r for r in rows if r["method"] in args.methods]
    for bits in args.bits:
        for method in [m for m in ("dch", "adsh") if m in args.methods]:
            cfg = dataclasses.replace(
                base, out=os.path.join(bundles, f"{method}-{bits}"), bits=bits, no_adversary=method == "dch"
            )
            run = hashing.main(cfg, data)
            rows.append(
                _row(
                    method, cfg, data, bits, run.metrics, train_s=round(run.train_s, 1), encode_s=round(run.encode_s, 2)
                )
            )
            _show(rows[-1])
    return rows


def keep_other_datasets(path: str, rows: list[dict], ran: set[str], methods: tuple[str, ...] | None = None) -> list:
    """``rows`` plus the rows already in ``path`` that this run did not measure: of another dataset, or (with
    ``methods``) of a method it did not run. Each kept row keeps its stamp."""
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        kept = [r for r in json.load(f) if r["dataset"] not in ran or (methods and r["method"] not in methods)]
    return kept + rows


PLOT_BITS = 48


def plot_curves(curves: list[dict], img_dir: str) -> dict[str, tuple[str, int]]:
    """One PNG per dataset at ``PLOT_BITS`` bits (else its longest codes): precision@k, and precision against
    recall as the Hamming radius grows (0, 1, 2, ...), one line per method. Returns {dataset: (file, bits)}."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    written = {}
    for dataset in dict.fromkeys(c["dataset"] for c in curves):
        lengths = {c["bits"] for c in curves if c["dataset"] == dataset}
        bits = PLOT_BITS if PLOT_BITS in lengths else max(lengths)
        sub = [c for c in curves if c["dataset"] == dataset and c["bits"] == bits]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
        for c in sorted(sub, key=lambda c: c["method"]):
            ks = sorted(c["precision_at_k_curve"], key=int)
            left.plot([int(k) for k in ks], [c["precision_at_k_curve"][k] for k in ks], marker="o", label=c["method"])
            pr = c["pr_curve"]
            right.plot(pr["recall"], pr["precision"], marker=".", label=c["method"])
        left.set(xscale="log", xlabel="k", ylabel="precision@k", title=f"{dataset}, {bits} bits")
        right.set(xlabel="recall", ylabel="precision", title="by Hamming radius 0, 1, 2, ...")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        left.legend()
        fig.tight_layout()
        name = f"hashing-{dataset}.png"
        fig.savefig(os.path.join(img_dir, name), dpi=110)
        plt.close(fig)
        written[dataset] = (name, bits)
    return written


def _stamps(rows: list[dict]) -> str:
    """Where and from which commit the rows came; per method when a ``--methods`` re-run mixed them."""
    by_stamp: dict[str, list[str]] = {}
    for r in rows:
        methods = by_stamp.setdefault(f"{r['machine']}; commit {r['commit']}", [])
        if r["method"] not in methods:
            methods.append(r["method"])
    if len(by_stamp) == 1:
        return f"Machine: {next(iter(by_stamp))}."
    return " ".join(f"{', '.join(sorted(m))}: {stamp}." for stamp, m in by_stamp.items())


def markdown(rows: list[dict], skipped: dict[str, str], quick: bool, plots: dict | None = None) -> str:
    lines = [
        f"Command: `make bench-hashing{' BENCH_ARGS=--quick' if quick else ''}` "
        "(`BENCH_ARGS='--datasets fashion-mnist'` for one dataset; the rows of the others are kept). "
        "Rows: `bench/results/hashing.json`.",
        "",
    ]
    for dataset in sorted({r["dataset"] for r in rows}, key=hashing.DATASETS.index):
        sub = [r for r in rows if r["dataset"] == dataset]
        r0 = sub[0]
        lines += [
            f"### {dataset} ({r0['protocol']}: {r0['query_size']:,} queries, {r0['database_size']:,} database, "
            f"seed {r0['seed']}, {r0['epochs']} epochs per network)",
            "",
            _stamps(sub),
            "",
            "| bits | method | mAP@all | mAP@1000 | P@r<=2 | queries with any hit r<=2 | P@100 | top-1 acc | train s "
            "| encode s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = ("adsh", "dch", "itq", "lsh")
        for r in sorted(sub, key=lambda r: (r["bits"], order.index(r["method"]))):
            cells = [f"{r[k]:.3f}" if k in r else "" for k in METRICS]
            lines.append(
                f"| {r['bits']} | {r['method']} | {' | '.join(cells)} | {r['train_s']:.0f} | {r['encode_s']:.1f} |"
            )
        lines.append("")
        if plots and dataset in plots:
            name, bits = plots[dataset]
            lines += [f"![{dataset}: precision@k and precision-recall at {bits} bits](img/{name})", ""]
    for dataset, why in skipped.items():
        lines += [f"{dataset}: skipped, {why}", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_doc(
    path: str,
    section: str,
    markers: tuple[str, str] = (BEGIN, END),
    title: str = "`make bench-hashing`: deep semantic hashing",
) -> None:
    """Replace the text between ``markers`` in ``path`` (appending a ``title`` heading and the markers if absent)."""
    begin, end = markers
    text = open(path).read() if os.path.exists(path) else "# Results\n"
    block = f"{begin}\n{section}{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(hashing.DATASETS), choices=hashing.DATASETS)
    p.add_argument("--bits", nargs="+", type=int, default=list(BITS))
    p.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="run these; keep the other methods' rows"
    )
    p.add_argument("--epochs", type=int, default=0, help="override the per-dataset epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data_dir", default="", help="default: $RETRIEVAL_DATA_DIR")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--quick", action="store_true", help="small seeded slices, few epochs (minutes)")
    p.add_argument("--limit_train", type=int, default=None, help="seeded database slice (default: all; --quick 1024)")
    p.add_argument("--limit_query", type=int, default=None, help="seeded query slice (default: all; --quick 256)")
    p.add_argument("--out", default=None, help="default: bench/results/hashing.json (--quick: hashing-quick.json)")
    p.add_argument(
        "--doc",
        default=None,
        help=f"Markdown file whose bench-hashing section is rewritten (default {DOC}; --quick: none)",
    )
    args = p.parse_args(argv)
    doc = (None if args.quick else DOC) if args.doc is None else args.doc

    out = args.out or os.path.join(RESULTS_DIR, "hashing-quick.json" if args.quick else "hashing.json")
    curves_out = out.removesuffix(".json") + "-curves.json"
    stamp = {"machine": machine(), "commit": commit()}
    rows, skipped = [], {}
    for dataset in args.datasets:
        why = available(dataset, args.data_dir or None)
        if why:
            print(f"{dataset}: skipped: {why}")
            skipped[dataset] = why
            continue
        new = [{**r, **stamp} for r in run_dataset(dataset, args, args.artifacts)]
        curves = [{k: r[k] for k in ("method", "dataset", "bits")} | r.pop("_curves") for r in new]
        methods = tuple(args.methods)
        write_rows("hashing-curves", keep_other_datasets(curves_out, curves, {dataset}, methods), curves_out)
        rows = keep_other_datasets(out, new, {dataset}, methods)
        print("wrote", write_rows("hashing", rows, out))
    if not rows:
        rows = keep_other_datasets(out, [], ran=set())
    plots = None
    if doc and os.path.exists(curves_out):  # the doc's images sit in img/ beside it
        with open(curves_out) as f:
            plots = plot_curves(json.load(f), os.path.join(os.path.dirname(doc) or ".", "img"))
    section = markdown(rows, skipped, args.quick, plots)
    print(section)
    if doc:
        update_doc(doc, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
