"""Embedding throughput of the Beam pipeline vs a plain PyTorch loop on the same images, and decoding alone.

    python -m bench.throughput [--quick] [--artifacts DIR] [--out PATH]

Everything is measured in one process, on one synthetic catalog (10,000 images; ``--quick`` 1,000), one method
after the other:

* **Decode alone** (read the file + ``decode_image`` to the bundle's input size): in one thread with the JPEG
  draft path off (every pixel decoded, then resized: the baseline, ratio 1), in one thread with draft (the
  pipeline's default), and with draft in a pool of ``--threads`` threads (default: one per core).
* **Plain PyTorch loop** (the baseline of the embedding comparison, ratio 1): what a hand-written script that
  produces the same feature table does, in one thread of control. Read the CSV catalog; for each row read the
  image (``read_bytes_stamped``, as the pipeline does, so the table gets the same ``source_stamp``), hash it and
  decode it; every ``--batch_size`` images call ``Encoder.encode``; build the ``schemas.feature_schema`` rows
  column-wise (``pipelines.transforms.inference.feature_batch``, the function the pipeline uses) and write one
  zstd Parquet file in 64 MB row groups. Loading the model is inside the timed span, as in the pipeline.
* **Beam pipeline**: ``pipelines.index_catalog.run --full`` on the local FnApiRunner (in-process, one worker, as
  ``make index`` runs it), timed around the call. ``ratio`` = pipeline images/s / loop images/s.

``--device cuda`` runs both on the GPU (mixed precision, as the pipeline's ``--device cuda``); the rows record the
device and ``machine`` names the GPU.

How the comparison is kept fair: both use the same images, bundle, ``Encoder`` and batch size (64, the
pipeline's default; the pipeline's batches are exactly that size, as the loop's) and the same torch threads (the
process default, recorded as ``torch_threads``). Before anything is timed every image is read once, so every
method reads from the page cache, and the model runs once, so none pays torch's one-off set-up. Each method runs
``--repeats`` times, alternating with the others, and its fastest run is kept, which damps noise from other
processes (``cpu_s``, this process's CPU time over the same span, helps to spot a disturbed run). As a check that
both did the same work, their feature tables are joined on ``item_id``: same rows and content hashes, identical
codes, embeddings equal up to ``embedding_max_abs_diff`` (float noise).

The pipeline does strictly more than the loop: a strict catalog parse with de-duplication (a shuffle), a
dead-letter table, the FAISS index build and publishing, plus Beam's own start-up and per-element work. The
headline ratio includes all of it. To show where it goes, each row carries stage times (the pipeline's from its
run report's ``timings``, the loop's measured the same way) and ``other_s``, the wall time outside them. And
both methods also run on the first tenth of the catalog: the ``...-marginal`` rows give the rate per extra image
between the two sizes (what a larger catalog tends to) and ``fixed_s``, the cost of a run whatever its size.

Writes ``bench/results/throughput.json`` (rows in the shape of CONVENTIONS.md) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import glob
import hashlib
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.common import commit, machine, pipeline_argv, write_rows
from pipelines.index_catalog import run as run_pipeline
from pipelines.transforms.inference import feature_batch
from pipelines.transforms.write import ROW_GROUP_BYTES
from retrieval_core import io as rio
from retrieval_core.bundle import CONFIG_FILE
from retrieval_core.data.synthetic import SyntheticConfig, generate_catalog
from retrieval_core.encoder import Encoder, resolve_device
from retrieval_core.preprocess import Preprocessing, decode_image
from schemas import feature_schema

# Run-report timings -> row keys (seconds). Anything else in the report is kept under a lower_snake name.
STAGE_KEYS = {
    "BundleModelHandler.load_model_latency_milli_secs": "load_model_s",
    "read_and_decode.read": "read_s",
    "read_and_decode.decode": "decode_s",
    "BundleModelHandler.inference_batch_latency_micro_secs": "infer_s",
}


@dataclass
class CatalogRow:
    """One catalog row as the loop uses it: the pipeline's ``item_id``, absolute ``image_uri`` and the rest."""

    item_id: str
    image_uri: str
    catalog: dict[str, str]


@dataclass
class Timed:
    """Wall time of one method and its stages, in seconds."""

    wall_s: float
    images: int
    cpu_s: float = 0.0  # CPU time of this process (all threads) over the same span
    stages: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.images / self.wall_s


def read_catalog(catalog: str) -> list[CatalogRow]:
    """The CSV catalog as a hand-written script reads it (image URIs relative to the catalog's folder)."""
    base = os.path.dirname(os.path.abspath(catalog))
    with open(catalog, newline="") as f:
        return [
            CatalogRow(
                r["item_id"],
                os.path.join(base, r["image_uri"]),
                {k: v for k, v in r.items() if k not in ("item_id", "image_uri")},
            )
            for r in csv.DictReader(f)
        ]


def time_decode(paths: list[str], prep: Preprocessing, *, draft: bool, threads: int) -> Timed:
    """Read each file and decode it to the model input size, in ``threads`` threads (1: a plain loop)."""

    def work(path: str) -> np.ndarray:
        return decode_image(pathlib.Path(path).read_bytes(), prep, draft=draft).pixels

    start, cpu = time.perf_counter(), time.process_time()
    if threads == 1:
        out = [work(p) for p in paths]
    else:
        with ThreadPoolExecutor(threads) as pool:
            out = list(pool.map(work, paths))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert len(out) == len(paths)
    return Timed(wall, len(paths), cpu)


def plain_loop(catalog: str, bundle: str, out_path: str, batch_size: int, run_id: str, device: str = "cpu") -> Timed:
    """Read, hash, decode, encode in batches and write one Parquet feature file; returns the timings."""
    stages = dict.fromkeys(("load_model_s", "read_s", "decode_s", "infer_s", "write_s"), 0.0)
    clock = time.perf_counter
    start, cpu = clock(), time.process_time()
    encoder = Encoder.from_bundle(bundle, device)
    stages["load_model_s"] = clock() - start
    cfg = encoder.config
    prep = cfg.preprocessing
    schema = feature_schema(cfg.embedding_dim, cfg.hash_bits)
    indexed_at = dt.datetime.now(dt.UTC)
    batches: list[pa.RecordBatch] = []
    buffered = 0
    metas: list[dict] = []
    pixels: list[np.ndarray] = []
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    writer = pq.ParquetWriter(out_path, schema, compression="zstd")

    def flush_batch() -> None:
        nonlocal buffered
        t = clock()
        encoded = encoder.encode(pixels)
        t2 = clock()
        batches.append(feature_batch(metas, encoded, cfg.model_id, run_id, indexed_at, schema))
        buffered += batches[-1].nbytes
        if buffered >= ROW_GROUP_BYTES:
            writer.write_table(pa.Table.from_batches(batches, schema))
            batches.clear()
            buffered = 0
        stages["infer_s"] += t2 - t
        stages["write_s"] += clock() - t2
        metas.clear()
        pixels.clear()

    for row in read_catalog(catalog):
        t = clock()
        data, stamp = rio.read_bytes_stamped(row.image_uri)
        t2 = clock()
        decoded = decode_image(data, prep)
        stages["decode_s"] += clock() - t2
        stages["read_s"] += t2 - t
        metas.append(
            {
                "item_id": row.item_id,
                "image_uri": row.image_uri,
                "content_sha256": hashlib.sha256(data).hexdigest(),
                "source_stamp": stamp,
                "width": decoded.width,
                "height": decoded.height,
                "catalog": row.catalog,
            }
        )
        pixels.append(decoded.pixels)
        if len(pixels) == batch_size:
            flush_batch()
    if pixels:
        flush_batch()
    t = clock()
    if batches:
        writer.write_table(pa.Table.from_batches(batches, schema))
    writer.close()
    stages["write_s"] += clock() - t
    wall, cpu = clock() - start, time.process_time() - cpu
    return Timed(wall, pq.ParquetFile(out_path).metadata.num_rows, cpu, stages, {"feature_files": [out_path]})


def lower_snake(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key.lower()).strip("_")


def pipeline_stages(timings: dict[str, dict]) -> tuple[dict[str, float], int]:
    """The run report's ``timings`` as row keys in seconds (index building summed), and the inference batches."""
    stages: dict[str, float] = {}
    for key, t in timings.items():
        if key.startswith("build_index."):
            name = "build_index_s"
        else:
            name = STAGE_KEYS.get(key) or lower_snake(key) + "_s"
        stages[name] = stages.get(name, 0.0) + t["total_s"]
    batches = timings.get("BundleModelHandler.inference_batch_latency_micro_secs", {}).get("count", 0)
    return stages, batches


def beam_pipeline(catalog: str, bundle: str, output: str, batch_size: int, run_id: str, device: str = "cpu") -> Timed:
    """A full run of the indexing pipeline on the local runner, from an empty output root."""
    shutil.rmtree(output, ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    report = run_pipeline(
        pipeline_argv(catalog, output, bundle, run_id, f"--batch_size={batch_size}", f"--device={device}", "--full")
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if report["counts"]["dead_letter"]:
        raise SystemExit(f"benchmark catalog produced dead letters ({report['counts']}): fix the setup")
    stages, batches = pipeline_stages(report["timings"])
    files = sorted(glob.glob(os.path.join(output, "features", f"run={run_id}", "*.parquet")))
    return Timed(wall, report["counts"]["indexed"], cpu, stages, {"infer_batches": batches, "feature_files": files})


def compare_tables(loop_files: list[str], pipeline_files: list[str]) -> dict:
    """Join the loop's and the pipeline's feature tables on item_id: do they hold the same results?"""
    cols = ["item_id", "content_sha256", "embedding", "hash_code", "category"]
    a, b = (
        pa.concat_tables(pq.read_table(f, columns=cols) for f in files).sort_by("item_id")
        for files in (loop_files, pipeline_files)
    )
    if a.column("item_id").to_pylist() != b.column("item_id").to_pylist():
        raise SystemExit(f"the loop wrote {a.num_rows} rows and the pipeline {b.num_rows}, for different items")
    emb_a = np.stack(a.column("embedding").to_numpy(zero_copy_only=False))
    emb_b = np.stack(b.column("embedding").to_numpy(zero_copy_only=False))
    codes_a, codes_b = (np.array(t.column("hash_code").to_pylist(), dtype=object) for t in (a, b))
    return {
        "same_content_hashes": a.column("content_sha256").equals(b.column("content_sha256")),
        "embedding_max_abs_diff": float(np.abs(emb_a - emb_b).max()) if len(emb_a) else 0.0,
        "codes_identical": float(np.mean(codes_a == codes_b)) if a.num_rows else 1.0,
    }


def best_of(repeats: int, methods: dict[str, Callable[[int], Timed]]) -> dict[str, Timed]:
    """Run each method ``repeats`` times, alternating between them; keep each one's fastest run, with the wall
    times of all its runs in ``extra["wall_s_runs"]``."""
    best: dict[str, Timed] = {}
    walls: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(repeats):
        for name, method in methods.items():
            t = method(i)
            rate = f"{t.items_per_s:.1f} images/s"
            print(f"  {name} run {i + 1}/{repeats}: {t.wall_s:.2f} s ({t.cpu_s:.2f} s CPU), {rate}", flush=True)
            walls[name].append(round(t.wall_s, 3))
            if name not in best or t.wall_s < best[name].wall_s:
                best[name] = t
    for name, t in best.items():
        t.extra["wall_s_runs"] = walls[name]
    return best


def warm_up(paths: list[str], bundle: str, batch_size: int, device: str = "cpu") -> Preprocessing:
    """Read every image once (page cache) and run the model once (torch's one-off set-up)."""
    data = [pathlib.Path(p).read_bytes() for p in paths]
    encoder = Encoder.from_bundle(bundle, device)
    prep = encoder.config.preprocessing
    sample = [decode_image(d, prep).pixels for d in data[:batch_size]]
    encoder.encode(sample)
    return prep


def rounded(stages: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in stages.items()}


def head_catalog(catalog: str, n: int, path: str) -> str:
    """A catalog of the first ``n`` rows of ``catalog`` (the same image files, by absolute path) at ``path``."""
    base = os.path.dirname(os.path.abspath(catalog))
    with open(catalog, newline="") as f:
        reader = csv.DictReader(f)
        rows = [{**r, "image_uri": os.path.join(base, r["image_uri"])} for _, r in zip(range(n), reader)]
        fields = reader.fieldnames or []
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def decode_rows(paths: list[str], prep: Preprocessing, threads: int, repeats: int, common: dict) -> list[dict]:
    """Rows of the decode-alone comparison; ratios against full decoding (no draft) in one thread."""
    settings = {"pil-full-decode": (False, 1), "pil-draft": (True, 1), f"pil-draft-{threads}-threads": (True, threads)}
    best = best_of(
        repeats,
        {
            name: lambda _i, draft=draft, n=n: time_decode(paths, prep, draft=draft, threads=n)
            for name, (draft, n) in settings.items()
        },
    )
    base = best["pil-full-decode"]
    return [
        {
            "method": name,
            **common,
            "protocol": "read-decode",
            "draft": settings[name][0],
            "threads": settings[name][1],
            "repeats": repeats,
            "wall_s": round(t.wall_s, 3),
            "cpu_s": round(t.cpu_s, 3),
            "items_per_s": round(t.items_per_s, 1),
            "ratio": round(t.items_per_s / base.items_per_s, 3),
        }
        for name, t in best.items()
    ]


def embed_rows(best: dict[str, Timed], sizes: tuple[int, int], batch_size: int, common: dict) -> list[dict]:
    """Rows of the loop-vs-pipeline comparison at both catalog sizes, then the marginal (per extra image) pair.

    The marginal rate between the small and the full run, (n_full - n_small) / (wall_full - wall_small),
    leaves out what a run costs whatever its size (start-up, planning, index training); ``fixed_s`` is
    that cost, the wall time the marginal rate does not explain.
    """
    rows = []
    for n in sizes:
        loop = best[f"pytorch-loop@{n}"]
        for method in ("pytorch-loop", "beam-pipeline"):
            t = best[f"{method}@{n}"]
            rows.append(
                {
                    "method": method,
                    **common,
                    "protocol": "read-decode-embed-write",
                    "images": t.images,
                    "wall_s": round(t.wall_s, 3),
                    "wall_s_runs": t.extra["wall_s_runs"],
                    "cpu_s": round(t.cpu_s, 3),
                    "items_per_s": round(t.items_per_s, 1),
                    "ratio": round(t.items_per_s / loop.items_per_s, 3),
                    **rounded(t.stages),
                    "other_s": round(t.wall_s - sum(t.stages.values()), 3),
                    "infer_batches": t.extra.get("infer_batches", -(-t.images // batch_size)),
                }
            )
    small, full = sizes
    marginal: dict[str, float | None] = {}
    for method in ("pytorch-loop", "beam-pipeline"):
        a, b = best[f"{method}@{small}"], best[f"{method}@{full}"]
        # Undefined (None) when the larger run was not the slower one: too few images to tell.
        marginal[method] = (b.images - a.images) / (b.wall_s - a.wall_s) if b.wall_s > a.wall_s else None
    for method, rate in marginal.items():
        b = best[f"{method}@{full}"]
        base = marginal["pytorch-loop"]
        rows.append(
            {
                "method": method,
                **common,
                "protocol": "read-decode-embed-write-marginal",
                "images": full - small,
                "items_per_s": None if rate is None else round(rate, 1),
                "ratio": None if rate is None or base is None else round(rate / base, 3),
                "fixed_s": None if rate is None else round(b.wall_s - b.images / rate, 3),
            }
        )
    return rows


def print_tables(rows: list[dict], machine_line: str, check: dict) -> None:
    """The rows as Markdown tables, for a terminal or docs/results.md."""
    print(f"\nMachine: {machine_line}, commit {rows[0]['commit']}.\n")
    print("| decode (read + decode_image) | threads | images | images/s | ratio |\n|---|---|---|---|---|")
    for r in rows:
        if r["protocol"] == "read-decode":
            print(f"| {r['method']} | {r['threads']} | {r['images']} | {r['items_per_s']} | {r['ratio']} |")
    embed = [r for r in rows if r["protocol"] == "read-decode-embed-write"]
    skip = ("wall_s", "cpu_s", "items_per_s", "other_s")
    stages = sorted({k for r in embed for k in r if k.endswith("_s") and k not in skip}) + ["other_s"]
    print(f"\n| embedding | images | images/s | ratio | wall s | {' | '.join(stages)} | batches |")
    print(f"|---|---|---|---|---|{'---|' * len(stages)}---|")
    for r in embed:
        cells = [r["method"], r["images"], r["items_per_s"], r["ratio"], r["wall_s"], *(r.get(k, "") for k in stages)]
        print("| " + " | ".join(str(c) for c in cells) + f" | {r['infer_batches']} |")
    print("\n| marginal (per extra image) | images | images/s | ratio | fixed s |\n|---|---|---|---|---|")
    for r in rows:
        if r["protocol"] == "read-decode-embed-write-marginal":
            print(f"| {r['method']} | {r['images']} | {r['items_per_s']} | {r['ratio']} | {r['fixed_s']} |")
    print(
        f"\nloop vs pipeline feature tables: same content hashes {check['same_content_hashes']}, codes identical "
        f"{check['codes_identical']:.3f}, embedding max abs diff {check['embedding_max_abs_diff']:.2e}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts", help="where the bench catalog and outputs go")
    p.add_argument("--bundle", default=None, help="model bundle (default: <artifacts>/bundles/baseline)")
    p.add_argument("--images", type=int, default=10_000, help="catalog size (rounded to whole products)")
    p.add_argument("--quick", action="store_true", help="1,000 images (CI smoke size)")
    p.add_argument("--batch_size", type=int, default=64, help="inference batch of both (the pipeline's default)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each method; the fastest is kept")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decode thread pool size")
    p.add_argument(
        "--torch_threads", type=int, default=0, help="torch intra-op threads for both (0: leave torch's default)"
    )
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="inference device of both (cuda: mixed precision)"
    )
    p.add_argument("--out", default=None, help="default: bench/results/throughput.json")
    args = p.parse_args(argv)
    resolve_device(args.device)  # --device cuda without a GPU: the clear error now, not after the decode rows
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    n_images = 1000 if args.quick else args.images
    bundle = args.bundle or os.path.join(args.artifacts, "bundles", "baseline")
    if not os.path.exists(os.path.join(bundle, CONFIG_FILE)):
        raise SystemExit(f"no bundle at {bundle}: run `make index` (or `make train-baseline`) first")
    ppc = max(1, round(n_images / 8 / 3))  # 8 categories, a shop view and 2 consumer views per product
    catalog = str(
        generate_catalog(
            os.path.join(args.artifacts, "bench", f"catalog-{ppc}"),
            SyntheticConfig(products_per_category=ppc, consumer_views=2, seed=2),
        )
    )
    work = os.path.join(args.artifacts, "bench", "throughput")
    shutil.rmtree(work, ignore_errors=True)
    paths = [r.image_uri for r in read_catalog(catalog)]
    sizes = (max(1, len(paths) // 10), len(paths))
    catalogs = {sizes[0]: head_catalog(catalog, sizes[0], os.path.join(work, "catalog-small.csv")), sizes[1]: catalog}
    prep = warm_up(paths, bundle, args.batch_size, args.device)
    common = {"dataset": "synthetic", "images": len(paths), "machine": machine(), "commit": commit()}

    print(f"decode alone: {len(paths)} images to {prep.image_size}x{prep.image_size}", flush=True)
    rows = decode_rows(paths, prep, args.threads, args.repeats, common)

    setting = f"batch {args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}"
    print(f"embedding: {sizes[1]} and {sizes[0]} images, {setting}", flush=True)
    methods: dict[str, Callable[[int], Timed]] = {}
    for n, cat in catalogs.items():
        methods[f"pytorch-loop@{n}"] = lambda i, n=n, cat=cat: plain_loop(
            cat,
            bundle,
            os.path.join(work, f"loop-{n}-{i}", "features.parquet"),
            args.batch_size,
            f"loop{i}",
            args.device,
        )
        methods[f"beam-pipeline@{n}"] = lambda i, n=n, cat=cat: beam_pipeline(
            cat, bundle, os.path.join(work, f"pipeline-{n}-{i}"), args.batch_size, f"pipeline{i}", args.device
        )
    best = best_of(args.repeats, methods)
    loop, pipe = best[f"pytorch-loop@{sizes[1]}"], best[f"beam-pipeline@{sizes[1]}"]
    check = compare_tables(loop.extra["feature_files"], pipe.extra["feature_files"])
    # float16 on the GPU: the same image in a different batch may take another kernel, so allow more there.
    tolerance = 1e-2 if args.device == "cuda" else 1e-3
    if not check["same_content_hashes"] or check["embedding_max_abs_diff"] > tolerance:
        raise SystemExit(f"the loop and the pipeline disagree: {check}")
    embed_common = {
        **common,
        "runner": "FnApiRunner",
        "device": args.device,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    embed = embed_rows(best, sizes, args.batch_size, embed_common)
    full_pipeline = next(r for r in embed if r["method"] == "beam-pipeline" and r["images"] == sizes[1])
    full_pipeline.update(check)  # the row of the tables compared records the cross-check
    rows += embed
    out = write_rows("throughput", rows, args.out)
    print_tables(rows, common["machine"], check)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
