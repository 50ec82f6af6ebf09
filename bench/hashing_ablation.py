"""``make bench-hashing-ablation``: which form of the ADSH adversary helps, over several seeds.

The full benchmark (``bench.hashing``) trains one network per method and bit length with one seed; a
difference of 0.01 mAP there is within seed noise. This runs the adversary's variants against DCH on a
seeded Fashion-MNIST slice (12,000 database images, 2,000 queries, 3 epochs, 48 bits by default), three
seeds each, everything else equal:

- ``dch``: no adversary;
- ``adsh-tanh``: the pair adversary on the tanh codes, weight 0.1, discriminator lr 1e-3 (the first default);
- ``adsh-binary``: the discriminator sees ``sign(h)`` (straight-through gradient), lr 1e-3;
- ``adsh-tanh-slow-disc``: tanh codes, discriminator lr 1e-4, so it wins later;
- ``adsh``: both, sign codes and lr 1e-4: the default since this ablation picked it;
- ``adsh-tanh-w0.3``: tanh codes, lr 1e-3, adversary weight 0.3;
- ``adsh-prior``: METHODS.md's alternative, codes against uniform +-1 draws (sign codes, lr 1e-4).

Every variant sets the adversary's settings explicitly, so a row means the same whatever the defaults are.

Each seed also seeds the slice, so the spread covers data as well as initialisation. Writes
``bench/results/hashing-ablation.json`` (one row per variant and seed) and a table of means and standard
deviations in ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

from bench.common import RESULTS_DIR, commit, machine, write_rows
from bench.hashing import DOC, update_doc
from retrieval_core.train import hashing

_PAIR = {"adversary": "pair", "w_adv": 0.1}
VARIANTS: dict[str, dict] = {
    "dch": {"no_adversary": True},
    "adsh-tanh": {**_PAIR, "adv_binary": False, "lr_disc": 1e-3},
    "adsh-binary": {**_PAIR, "adv_binary": True, "lr_disc": 1e-3},
    "adsh-tanh-slow-disc": {**_PAIR, "adv_binary": False, "lr_disc": 1e-4},
    "adsh": {**_PAIR, "adv_binary": True, "lr_disc": 1e-4},
    "adsh-tanh-w0.3": {**_PAIR, "adv_binary": False, "lr_disc": 1e-3, "w_adv": 0.3},
    "adsh-prior": {"adversary": "prior", "w_adv": 0.1, "adv_binary": True, "lr_disc": 1e-4},
}
METRICS = ("map_all", "map_at_1000", "precision_r2", "top1_acc")
MARKERS = ("<!-- bench-hashing-ablation:begin -->", "<!-- bench-hashing-ablation:end -->")
SIZES = {"limit_train": 12000, "limit_query": 2000, "epochs": 3}
QUICK_SIZES = {"limit_train": 512, "limit_query": 128, "epochs": 1}


def run(args) -> list[dict]:
    sizes = QUICK_SIZES if args.quick else SIZES
    rows = []
    for seed in args.seeds:
        base = hashing.HashingConfig(
            bits=args.bits, seed=seed, threads=args.threads, data_dir=args.data_dir, **sizes, out=""
        )
        data = hashing.load_data(base)
        for name in args.variants:
            cfg = dataclasses.replace(base, out=os.path.join(args.artifacts, "bench", "ablation", f"{name}-{seed}"))
            cfg = dataclasses.replace(cfg, **VARIANTS[name])
            result = hashing.main(cfg, data)
            rows.append(
                {
                    "method": name,
                    "dataset": "fashion-mnist",
                    "protocol": data.protocol + " (seeded slice)",
                    "bits": args.bits,
                    # mAP@1000 is left out when the database is smaller than 1,000 (--quick).
                    **{k: round(float(result.metrics[k]), 4) for k in METRICS if k in result.metrics},
                    "train_s": round(result.train_s, 1),
                    "epochs": cfg.epochs,
                    "seed": seed,
                    "database_size": int(len(data.db_labels)),
                    "query_size": int(len(data.query_labels)),
                    "overrides": VARIANTS[name],
                }
            )
            print({k: rows[-1].get(k) for k in ("method", "seed", *METRICS)})
    return rows


def markdown(rows: list[dict], quick: bool) -> str:
    r0 = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"Command: `make bench-hashing-ablation{' BENCH_ARGS=--quick' if quick else ''}`. "
        "Rows: `bench/results/hashing-ablation.json`.",
        "",
        f"Fashion-MNIST, seeded slices of {r0['database_size']:,} database and {r0['query_size']:,} query images "
        f"(the slice changes with the seed), {r0['bits']} bits, {r0['epochs']} epochs, seeds "
        f"{', '.join(map(str, seeds))}; mean and standard deviation over the seeds. Machine: {r0['machine']}; "
        f"commit {r0['commit']}.",
        "",
        "| variant | settings | mAP@all | mAP@1000 | P@r<=2 | top-1 acc | mAP@all - DCH's, per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    dch = {r["seed"]: r["map_all"] for r in rows if r["method"] == "dch"}
    for name in dict.fromkeys(r["method"] for r in rows):
        sub = [r for r in rows if r["method"] == name]
        cells = []
        for k in METRICS:
            values = [r[k] for r in sub if k in r]
            if not values:
                cells.append("n/a")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {sd:.4f}")
        gaps = ", ".join(f"{r['map_all'] - dch[r['seed']]:+.4f}" for r in sub if r["seed"] in dch)
        settings = ", ".join(f"{k}={v}" for k, v in sub[0]["overrides"].items()) or "defaults"
        lines.append(f"| {name} | {settings} | {' | '.join(cells)} | {gaps} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data_dir", default="", help="default: $RETRIEVAL_DATA_DIR, then /usr/share/datasets")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--quick", action="store_true", help="512 / 128 images, 1 epoch (seconds per variant)")
    p.add_argument("--out", default=None, help="default: bench/results/hashing-ablation.json (--quick: -quick)")
    p.add_argument("--doc", default=None, help=f"Markdown file to update (default {DOC}; --quick: none)")
    args = p.parse_args(argv)
    doc = (None if args.quick else DOC) if args.doc is None else args.doc
    out = args.out or os.path.join(RESULTS_DIR, f"hashing-ablation{'-quick' if args.quick else ''}.json")
    started = time.perf_counter()
    stamp = {"machine": machine(), "commit": commit()}
    rows = [{**r, **stamp} for r in run(args)]
    print("wrote", write_rows("hashing-ablation", rows, out), f"in {time.perf_counter() - started:.0f} s")
    section = markdown(rows, args.quick)
    print(section)
    if doc:
        update_doc(doc, section, MARKERS, "`make bench-hashing-ablation`: the adversary's variants over seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
