"""``make bench-index``: build a 1M x 128 index through BuildIndex vs plain FAISS, then recall, latency and load.

One run, one machine, the same input and the same factory string for both:

1. **Data.** ``n`` clustered unit vectors (a 1,000-component Gaussian mixture in a 32-d latent space, mapped
   to 128-d by a random linear map, plus isotropic noise: embeddings of a catalog have a low intrinsic
   dimension) and 64-bit codes (signs of random projections), written as feature-table Parquet files of
   50,000 rows (the index columns). 1,000 held-out queries from the same distribution.
2. **Build.** The index type is chosen by ``choose_spec`` from the size and ``--max_index_memory``; then,
   each in a fresh process so peak RSS is its own:
   - ``beam``: the pipeline's ``BuildIndex`` and ``Publish`` transforms on the local runner, reading the
     Parquet files, ``--shards`` shards of the float and the binary index plus id files, and a manifest;
   - ``faiss``: a plain script doing the same work: read the two columns of every file into one array, train
     on a random sample of the same size, add everything to one index, build the same binary index, write
     both.
3. **Search.** Recall@10 against an exact ``IndexFlatIP`` (the fraction of the true 10 nearest found in the
   10 returned, averaged over the queries) and batched latency at several ``nprobe``: through the
   ``Searcher`` on the published shards, and on the plain index.
4. **Load** (``serving.json``). A fresh process opens the published generation with ``Searcher.open``,
   memory-mapped or read into memory, and answers one query: time to first query and RSS (all, and the
   anonymous part that is not page cache), with and without checksum verification. The files were just
   written, so they are in the page cache: this is a warm start.

Writes ``bench/results/index_build.json`` and ``bench/results/serving.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import RESULTS_DIR, commit, machine, timed, write_rows
from retrieval_core.index.build import choose_spec, parse_bytes

ROWS_PER_FILE = 50_000
LATENT, COMPONENTS = 32, 1000
BITS = 64
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMMON_KEYS = (
    "dataset",
    "vectors",
    "dim",
    "queries",
    "factory",
    "binary_factory",
    "max_index_memory",
    "estimated_bytes",
    "train_sample",
    "faiss_threads",
)
LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


# -- data -----------------------------------------------------------------------------------------------------


class Generator:
    """Clustered unit vectors and their codes; the same seed gives the same model, any slice the same rows."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = rng.standard_normal((COMPONENTS, LATENT)).astype(np.float32)
        self.lift = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.planes = rng.standard_normal((dim, BITS)).astype(np.float32)

    def vectors(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        z = self.centres[rng.integers(0, COMPONENTS, n)] + 0.5 * rng.standard_normal((n, LATENT), np.float32)
        x = z @ self.lift + 0.1 * rng.standard_normal((n, self.dim), np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def codes(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(x @ self.planes > 0, axis=1)


def write_features(gen: Generator, n: int, directory: str) -> list[str]:
    """The index columns of the feature table, ``ROWS_PER_FILE`` rows per file, generated file by file."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for f, start in enumerate(range(0, n, ROWS_PER_FILE)):
        rows = min(ROWS_PER_FILE, n - start)
        x = gen.vectors(rows, seed=1000 + f)
        ids = [f"item{i:08d}" for i in range(start, start + rows)]
        table = pa.table(
            {
                "item_id": pa.array(ids, pa.string()),
                "content_sha256": pa.array([f"{i:064x}" for i in range(start, start + rows)], pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), gen.dim),
                "hash_code": pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(BITS // 8), rows, [None, pa.py_buffer(gen.codes(x).tobytes())]
                ),
            }
        )
        path = os.path.join(directory, f"part-{f:05d}.parquet")
        pq.write_table(table, path, compression="zstd")
        paths.append(path)
    return paths


def read_columns(paths: list[str], dim: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All vectors, codes and item ids of the files, column-wise (what a plain script would do)."""
    tables = [pq.read_table(p, columns=["item_id", "embedding", "hash_code"]) for p in paths]
    n = sum(t.num_rows for t in tables)
    vectors, codes, ids, row = np.empty((n, dim), np.float32), np.empty((n, BITS // 8), np.uint8), [], 0
    for t in tables:
        m = t.num_rows
        vectors[row : row + m] = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(m, dim)
        chunk = t.column("hash_code").combine_chunks()
        codes[row : row + m] = np.frombuffer(chunk.buffers()[1], np.uint8)[: m * BITS // 8].reshape(m, -1)
        ids += t.column("item_id").to_pylist()
        row += m
    return vectors, codes, ids


# -- the two builds, each run in a child process -----------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> dict[str, float]:
    """Resident memory now: all of it, the anonymous part (heap, arrays) and the file-backed part (mapped files,
    shared libraries)."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


def build_beam(args) -> dict:
    import apache_beam as beam

    from pipelines.transforms.build_index import BuildIndex
    from pipelines.transforms.publish import Publish
    from pipelines.transforms.timing import query_metrics, stage_timings

    paths = sorted(os.path.join(args.features, f) for f in os.listdir(args.features))
    rel = "indices/bench"
    base = _rss_mb()["VmRSS"]
    started = time.perf_counter()
    p = beam.Pipeline(runner=LOCAL_RUNNER)
    files = p | "Files" >> beam.Create(paths, reshuffle=False)
    shards, spec = files | "BuildIndex" >> BuildIndex(
        os.path.join(args.output, rel),
        rel,
        num_shards=args.shards,
        dim=args.dim,
        hash_bits=BITS,
        train_sample_size=args.train_sample,
        max_index_memory=args.max_index_memory,
    )
    none = p | "NoTables" >> beam.Create([], reshuffle=False)
    _ = (shards, spec, none, none) | "Publish" >> Publish(
        output_root=args.output,
        generation="bench",
        run_id="bench",
        model_id="bench-vectors",
        model_name="bench",
        dim=args.dim,
        hash_bits=BITS,
    )
    result = p.run()
    result.wait_until_finish()
    build_s = time.perf_counter() - started
    # The local runner runs one stage at a time, so these stage totals are wall time.
    stages = stage_timings(query_metrics(result))
    return {
        "build_s": build_s,
        "peak_rss_mb": _peak_rss_mb(),
        "base_rss_mb": base,
        "read_s": stages["build_index.read_features"]["total_s"],
        "train_s": stages["build_index.train"]["total_s"],
        "fill_s": stages["build_index.fill_and_write_shard"]["total_s"],
    }


def build_faiss(args) -> dict:
    from retrieval_core.index.build import METRIC_TYPES, REFINE_K_FACTOR, train_index

    paths = sorted(os.path.join(args.features, f) for f in os.listdir(args.features))
    base = _rss_mb()["VmRSS"]
    started = time.perf_counter()
    vectors, codes, _ = read_columns(paths, args.dim)
    read_s = time.perf_counter() - started
    index = faiss.index_factory(args.dim, args.factory, METRIC_TYPES["inner_product"])
    sample = vectors[np.random.default_rng(0).choice(len(vectors), min(args.train_sample, len(vectors)), False)]
    t = time.perf_counter()
    train_index(index, sample)  # index.train, with the k-means on the GPUs when there are any, as in BuildIndex
    train_s = time.perf_counter() - t
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_K_FACTOR
    t = time.perf_counter()
    index.add(vectors)
    add_s = time.perf_counter() - t
    binary = faiss.index_binary_factory(BITS, args.binary_factory)
    binary.add(codes)
    faiss.write_index(index, os.path.join(args.output, "plain.faiss"))
    faiss.write_index_binary(binary, os.path.join(args.output, "plain_binary.faiss"))
    return {
        "build_s": time.perf_counter() - started,
        "peak_rss_mb": _peak_rss_mb(),
        "base_rss_mb": base,
        "read_s": read_s,
        "train_s": train_s,
        "add_s": add_s,
        "fill_s": time.perf_counter() - t,  # add, the binary index, writing both: what BuildIndex's fill_s covers
    }


def serve(args) -> dict:
    """Open the published generation and answer one query; RSS from /proc after it."""
    from retrieval_core.search import Searcher

    query = np.load(args.query)
    before = _rss_mb()
    started = time.perf_counter()
    searcher = Searcher.open(args.output, mmap=bool(args.mmap), verify=args.verify == "1")
    searcher.search_vectors(query, 10)
    first_query_s = time.perf_counter() - started
    after = _rss_mb()
    return {
        "first_query_s": first_query_s,
        "rss_added_mb": after["VmRSS"] - before["VmRSS"],
        "anon_added_mb": after["RssAnon"] - before["RssAnon"],
        "file_added_mb": after["RssFile"] - before["RssFile"],
        "base_rss_mb": before["VmRSS"],
    }


def child(role: str, args, *extra: str) -> dict:
    """Run ``role`` in a fresh Python process; its result comes back as the last line of stdout."""
    cmd = [sys.executable, "-m", "bench.index_build", "--child", role, *_forward(args), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{role} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward(args) -> list[str]:
    return [
        f"--features={args.features}",
        f"--output={args.output}",
        f"--dim={args.dim}",
        f"--shards={args.shards}",
        f"--train_sample={args.train_sample}",
        f"--factory={args.factory}",
        f"--binary_factory={args.binary_factory}",
        f"--max_index_memory={args.max_index_memory}",
    ]


# -- search ------------------------------------------------------------------------------------------------


def recall_at_10(found, truth: np.ndarray) -> float:
    """Mean fraction of each query's true neighbours (rows of ``truth``) among the rows ``found`` for it."""
    return float(np.mean([len({int(r) for r in f if r >= 0} & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def search_curves(args, queries: np.ndarray, truth: np.ndarray, row_of: dict[str, int]) -> list[dict]:
    from retrieval_core.search import Searcher

    searcher = Searcher.open(args.output)
    plain = faiss.read_index(os.path.join(args.output, "plain.faiss"))
    ivf = faiss.extract_index_ivf(plain)
    nlist = ivf.nlist
    rows = []
    for nprobe in (p for p in NPROBES if p <= nlist):
        s_sharded, result = timed(lambda nprobe=nprobe: searcher.search_vectors(queries, 10, nprobe=nprobe))
        sharded_rows = [[row_of[i] for i in items if i is not None] for items in result.item_ids]
        ivf.nprobe = nprobe
        s_plain, (_, plain_rows) = timed(lambda: plain.search(queries, 10))
        rows.append(
            {
                "nprobe": nprobe,
                "beam_recall_at_10": round(recall_at_10(sharded_rows, truth), 4),
                "beam_ms_per_query": round(1000 * s_sharded / len(queries), 4),
                "faiss_recall_at_10": round(recall_at_10(plain_rows, truth), 4),
                "faiss_ms_per_query": round(1000 * s_plain / len(queries), 4),
            }
        )
    return rows


# -- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--train_sample", type=int, default=65536, help="vectors sampled to train (BuildIndex default)")
    p.add_argument("--max_index_memory", default="256M", help="budget for the automatic choice")
    p.add_argument("--factory", default="", help="force a factory string (default: chosen by choose_spec)")
    p.add_argument("--binary_factory", default="")
    p.add_argument(
        "--quick", action="store_true", help="100,000 vectors, 200 queries, 20,000 training vectors (CI smoke size)"
    )
    p.add_argument("--verify", default="0,1", help="load with checksum verification off (0) and/or on (1)")
    p.add_argument("--work", default=os.path.join("artifacts", "bench", "index_build"))
    p.add_argument("--out", default=None, help="default: bench/results/index_build.json")
    p.add_argument("--serving_out", default=None, help="default: bench/results/serving.json")
    p.add_argument(
        "--serving_only",
        action="store_true",
        help="only re-measure loading the generation the last run left in --work (after a Searcher change)",
    )
    p.add_argument("--child", choices=("beam", "faiss", "serve"), help=argparse.SUPPRESS)
    p.add_argument("--features", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--mmap", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.max_index_memory = parse_bytes(args.max_index_memory)
    if args.child:
        result = {"beam": build_beam, "faiss": build_faiss, "serve": serve}[args.child](args)
        print(json.dumps(result))
        return 0
    if args.serving_only:
        args.features, args.output = os.path.join(args.work, "features"), os.path.join(args.work, "output")
        with open(args.out or os.path.join(RESULTS_DIR, "index_build.json")) as f:
            built = json.load(f)[1]
        common = {k: built[k] for k in COMMON_KEYS} | {"machine": machine(), "commit": commit()}
        measure_serving(args, common)
        return 0
    if args.quick:  # the budget scales with the size, so the same index type is chosen
        args.max_index_memory = args.max_index_memory * 100_000 // args.n
        args.n, args.queries, args.train_sample = 100_000, 200, min(args.train_sample, 20_000)

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    args.features, args.output = os.path.join(work, "features"), os.path.join(work, "output")
    os.makedirs(args.output)
    gen = Generator(args.dim)
    t = time.perf_counter()
    paths = write_features(gen, args.n, args.features)
    print(f"wrote {args.n:,} x {args.dim} vectors in {len(paths)} files ({time.perf_counter() - t:.1f} s)", flush=True)
    spec = choose_spec(args.n, None, None, BITS, None, dim=args.dim, max_index_memory=args.max_index_memory)
    args.factory = args.factory or spec.vector_factory
    args.binary_factory = args.binary_factory or spec.binary_factory
    print(f"index: {args.factory} / {args.binary_factory} (budget {args.max_index_memory:,} bytes)", flush=True)

    runs = {}
    for name, method in (("BuildIndex", "beam"), ("plain faiss", "faiss")):
        r = runs[method] = child(method, args)
        print(
            f"{name}: {r['build_s']:.1f} s (read {r['read_s']:.1f}, train {r['train_s']:.1f}, fill and write "
            f"{r['fill_s']:.1f}), peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    beam_run, plain_run = runs["beam"], runs["faiss"]

    from retrieval_core.search import Searcher

    manifest = Searcher.open(args.output).manifest
    if manifest.vector_factory != args.factory or manifest.ntotal != args.n:
        raise SystemExit(f"BuildIndex built {manifest.vector_factory} x {manifest.ntotal}, expected {args.factory}")
    vectors, _, ids = read_columns(paths, args.dim)
    queries = gen.vectors(args.queries, seed=7)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    del exact, vectors
    curve = search_curves(args, queries, truth, {item: row for row, item in enumerate(ids)})

    common = {
        "dataset": "synthetic-clustered-vectors",
        "vectors": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "factory": args.factory,
        "binary_factory": args.binary_factory,
        "max_index_memory": args.max_index_memory,
        "estimated_bytes": manifest.index_selection.get("estimated_bytes"),
        "train_sample": args.train_sample,
        "machine": machine(),
        "commit": commit(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    shard_bytes = sum(s.bytes for s in manifest.vector_shards)
    plain_bytes = os.path.getsize(os.path.join(args.output, "plain.faiss"))
    good = [c for c in curve if c["beam_recall_at_10"] >= 0.95]
    rows = [
        {
            "method": "faiss",
            **common,
            "shards": 1,
            **{k: round(v, 3) for k, v in plain_run.items()},
            "index_mb": round(plain_bytes / 2**20, 1),
            "curve": [{k.removeprefix("faiss_"): v for k, v in c.items() if not k.startswith("beam")} for c in curve],
        },
        {
            "method": "beam-buildindex",
            **common,
            "shards": args.shards,
            **{k: round(v, 3) for k, v in beam_run.items()},
            "build_time_ratio": round(beam_run["build_s"] / plain_run["build_s"], 3),
            "index_mb": round(shard_bytes / 2**20, 1),
            "curve": [{k.removeprefix("beam_"): v for k, v in c.items() if not k.startswith("faiss")} for c in curve],
            "first_nprobe_recall_0_95": good[0]["nprobe"] if good else None,
        },
    ]
    out = write_rows("index_build", rows, args.out)
    print(f"\nbuild-time ratio (BuildIndex / plain faiss): {rows[1]['build_time_ratio']}")
    print("| nprobe | sharded recall@10 | ms/query | plain recall@10 | ms/query |\n|---|---|---|---|---|")
    for c in curve:
        print(
            f"| {c['nprobe']} | {c['beam_recall_at_10']} | {c['beam_ms_per_query']} | "
            f"{c['faiss_recall_at_10']} | {c['faiss_ms_per_query']} |"
        )
    print(f"wrote {out}")

    np.save(os.path.join(work, "query.npy"), queries[:1])
    measure_serving(args, common)
    return 0


def measure_serving(args, common: dict) -> None:
    """Load rows: a fresh process per way of opening the generation under ``args.output``."""
    from retrieval_core.index.publish import load_manifest

    shard_bytes = sum(s.bytes for s in load_manifest(args.output).vector_shards)
    query_path = os.path.join(args.work, "query.npy")
    serving = []
    for mmap in (1, 0):
        for verify in args.verify.split(","):
            result = child("serve", args, f"--query={query_path}", f"--mmap={mmap}", f"--verify={verify}")
            serving.append(
                {
                    "method": "mmap" if mmap else "read",
                    "verify": verify == "1",
                    **common,
                    "index_mb": round(shard_bytes / 2**20, 1),
                    **{k: round(v, 3) for k, v in result.items()},
                }
            )
    out = write_rows("serving", serving, args.serving_out)
    print("| open | verify | first query s | RSS added MB | anonymous | file-backed |\n|---|---|---|---|---|---|")
    for r in serving:
        print(
            f"| {r['method']} | {r['verify']} | {r['first_query_s']} | {r['rss_added_mb']} | {r['anon_added_mb']} | "
            f"{r['file_added_mb']} |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
