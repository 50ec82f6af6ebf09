"""``make bench-incremental``: wall time of a nightly run where 1% of the catalog changed, vs a full run.

Both runs use the same catalog size, bundle, runner and machine, one after the
other. Day two changes 1% of the rows: half re-encoded images (new bytes), a
quarter removed items, a quarter new items. Day two runs twice from the same
day-one output: as scheduled (unchanged images are recognised by their stored
size/mtime stamp and not read) and with ``--rehash`` (every image read and
hashed). Writes ``bench/results/incremental.json`` (rows in the shape of
CONVENTIONS.md) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import time

from PIL import Image, ImageOps

from bench.common import commit, machine, pipeline_argv, write_rows
from pipelines.index_catalog import run as run_pipeline
from retrieval_core.bundle import CONFIG_FILE
from retrieval_core.data.synthetic import SyntheticConfig, generate_catalog


def day_two(catalog: str, work: str, fraction: float, seed_rows: list[dict]) -> str:
    """Write a catalog in which ``fraction`` of the rows changed; returns its path."""
    with open(catalog, newline="") as f:
        rows = list(csv.DictReader(f))
    base = os.path.dirname(os.path.abspath(catalog))
    n = max(4, round(len(rows) * fraction))
    n_changed, n_removed = n // 2, n // 4
    n_added = n - n_changed - n_removed
    os.makedirs(os.path.join(work, "changed"), exist_ok=True)
    out_rows = []
    for i, row in enumerate(rows):
        row = {**row, "image_uri": os.path.join(base, row["image_uri"])}
        if i < n_removed:
            continue
        if i < n_removed + n_changed:  # same item, new bytes (a re-shot photo)
            path = os.path.abspath(os.path.join(work, "changed", os.path.basename(row["image_uri"])))
            ImageOps.mirror(Image.open(row["image_uri"])).save(path, quality=88)
            row["image_uri"] = path
        out_rows.append(row)
    out_rows += seed_rows[:n_added]
    path = os.path.join(work, "catalog_day2.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(out_rows)
    return path


def timed_run(catalog: str, output: str, bundle: str, run_id: str, *extra: str) -> tuple[float, dict]:
    t = time.perf_counter()
    report = run_pipeline(pipeline_argv(catalog, output, bundle, run_id, *extra))
    return time.perf_counter() - t, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--images", type=int, default=10_000, help="catalog size")
    p.add_argument("--fraction", type=float, default=0.01, help="share of rows that change on day two")
    p.add_argument("--quick", action="store_true", help="1,000 images (CI smoke size)")
    p.add_argument("--out", default=None, help="default: bench/results/incremental.json")
    p.add_argument("--bundle", default=None, help="model bundle (default: <artifacts>/bundles/baseline)")
    args = p.parse_args(argv)
    n_images = 1000 if args.quick else args.images
    bundle = args.bundle or os.path.join(args.artifacts, "bundles", "baseline")
    if not os.path.exists(os.path.join(bundle, CONFIG_FILE)):
        raise SystemExit(f"no bundle at {bundle}: run `make index` (or `make train-baseline`) first")
    ppc = max(1, round(n_images / 8 / 3))
    catalog = str(
        generate_catalog(
            os.path.join(args.artifacts, "bench", f"catalog-{ppc}"),
            SyntheticConfig(products_per_category=ppc, consumer_views=2, seed=2),
        )
    )
    extra = str(
        generate_catalog(
            os.path.join(args.artifacts, "bench", "extra"),
            SyntheticConfig(products_per_category=ppc // 10 + 2, consumer_views=2, seed=3),
        )
    )
    with open(extra, newline="") as f:
        base = os.path.dirname(os.path.abspath(extra))
        new_rows = [
            {**r, "item_id": "new-" + r["item_id"], "image_uri": os.path.join(base, r["image_uri"])}
            for r in csv.DictReader(f)
        ]
    work = os.path.join(args.artifacts, "bench", "incremental")
    shutil.rmtree(work, ignore_errors=True)
    output = os.path.join(work, "out")
    full_s, full = timed_run(catalog, output, bundle, "day1", "--full")
    shutil.copytree(output, output + "-rehash")
    catalog2 = day_two(catalog, work, args.fraction, new_rows)
    incremental = {
        "incremental": timed_run(catalog2, output, bundle, "day2"),
        "incremental-rehash": timed_run(catalog2, output + "-rehash", bundle, "day2", "--rehash"),
    }
    for _, report in [(full_s, full), *incremental.values()]:
        if report["counts"]["dead_letter"]:
            raise SystemExit(f"benchmark catalog produced dead letters ({report['counts']}): fix the setup")
    common = {
        "dataset": "synthetic",
        "protocol": f"{args.fraction:.0%}-changed",
        "images": full["counts"]["indexed"],
        "machine": machine(),
        "commit": commit(),
        "runner": "FnApiRunner",
    }
    rows = [
        {
            "method": "full",
            **common,
            "wall_s": round(full_s, 2),
            "decoded": full["counters"]["read_and_decode.decoded"],
            "items_per_s": round(full["counts"]["indexed"] / full_s, 1),
        },
    ]
    for method, (inc_s, inc) in incremental.items():
        rows.append(
            {
                "method": method,
                **common,
                "wall_s": round(inc_s, 2),
                "decoded": inc["counters"]["read_and_decode.decoded"],
                **{k: inc["counts"][k] for k in ("new", "changed", "unchanged", "removed", "hashed", "stamp_hits")},
                "ratio": round(inc_s / full_s, 3),
            }
        )
    out = write_rows("incremental", rows, args.out)
    print("| run | images | read and hashed | decoded | wall s | ratio |\n|---|---|---|---|---|---|")
    print(f"| full | {rows[0]['images']} | {rows[0]['images']} | {rows[0]['decoded']} | {rows[0]['wall_s']} | 1 |")
    for r in rows[1:]:
        print(
            f"| {r['method']} ({r['new']} new, {r['changed']} changed, {r['removed']} removed) | {r['images']} | "
            f"{r['hashed']} | {r['decoded']} | {r['wall_s']} | {r['ratio']} |"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
