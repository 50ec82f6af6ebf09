"""Index a catalog: images -> embeddings and hash codes -> Parquet features + sharded FAISS indices.

    python -m pipelines.index_catalog --catalog catalog.csv --output out/ --bundle bundles/baseline \\
        --runner apache_beam.runners.portability.fn_api_runner.FnApiRunner

Any standard Beam flag (``--runner``, ``--temp_location``, ``--project``, ...) is
passed to the runner. The graph: ReadCatalog -> ReadAndDecode -> Embed
(RunInference) -> WriteFeatures / WriteDeadLetter -> BuildIndex (from the written
feature files) -> Publish. An incremental run adds SkipUnchanged before decoding;
its carried rows are written as feature files directly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import secrets
import sys
import time
from dataclasses import asdict, dataclass

import apache_beam as beam
import faiss
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.lifecycle import LockedError, OutputLock, prune
from pipelines.transforms.build_index import BuildIndex
from pipelines.transforms.catalog import CatalogError, ReadCatalog, catalog_format
from pipelines.transforms.decode import ReadAndDecode
from pipelines.transforms.incremental import SkipUnchanged
from pipelines.transforms.inference import Embed
from pipelines.transforms.publish import Publish, error_rate
from pipelines.transforms.timing import query_metrics, stage_timings
from pipelines.transforms.write import WriteTable, table_prefix
from retrieval_core import io as rio
from retrieval_core.bundle import BundleConfig, verify_bundle
from retrieval_core.encoder import parse_device, resolve_device
from retrieval_core.index.build import METRIC_TYPES, IndexSpec, parse_bytes
from retrieval_core.index.publish import CURRENT_FILE, MANIFEST_FILE, load_manifest, read_current
from schemas import DEAD_LETTER_SCHEMA, feature_schema

log = logging.getLogger("index_catalog")
METRIC = METRIC_TYPES[IndexSpec.metric]  # the metric BuildIndex builds with

LOCAL_RUNNERS = (
    "DirectRunner",
    "FnApiRunner",
    "BundleBasedDirectRunner",
    "SwitchingDirectRunner",
    "apache_beam.runners.portability.fn_api_runner.FnApiRunner",
    "apache_beam.runners.direct.direct_runner.DirectRunner",
)


class IndexOptions(PipelineOptions):
    """The pipeline's own flags; every other flag is a standard Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--catalog", help="catalog file: .csv, .jsonl or .parquet (local or gs://)")
        parser.add_argument("--output", help="output root (local or gs://)")
        parser.add_argument("--bundle", help="model bundle directory")
        parser.add_argument("--num_shards", type=int, default=4, help="shards of each index")
        parser.add_argument("--batch_size", type=int, default=64, help="largest inference batch")
        parser.add_argument("--device", default="cpu", help="inference device: cpu, cuda or cuda:N")
        parser.add_argument(
            "--index_factory",
            default=None,
            help="force a faiss factory string (default: chosen from the number of vectors)",
        )
        parser.add_argument(
            "--binary_factory",
            default=None,
            help="force a faiss binary factory string, e.g. BFlat or BHash3x21 (default: chosen from the size)",
        )
        parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed at query time")
        parser.add_argument(
            "--max_index_memory",
            default=None,
            help="memory budget of the vector shards together, e.g. 2G or 512M: above it a compressed index "
            "(IVF-PQ with SQ8 re-ranking, then IVF-PQ) is chosen automatically (default: no budget)",
        )
        parser.add_argument("--train_sample_size", type=int, default=65536, help="vectors sampled to train the index")
        parser.add_argument(
            "--feature_shards", type=int, default=0, help="Parquet files per run (0: let the runner decide)"
        )
        parser.add_argument("--run_id", default=None, help="run id (default: UTC timestamp + random suffix)")
        parser.add_argument(
            "--full", action="store_true", help="re-embed every image (default: only new and changed ones)"
        )
        parser.add_argument(
            "--rehash",
            action="store_true",
            help="read and hash every image to find changes, trusting no stored size/mtime or GCS generation",
        )
        parser.add_argument("--keep_generations", type=int, default=3, help="published generations to keep")
        parser.add_argument(
            "--max_error_rate",
            type=float,
            default=1.0,
            help="fraction of dead-letter rows above which the generation is written but not published (exit 4)",
        )


@dataclass(frozen=True)
class IndexConfig:
    """Validated settings of one run; nothing below ``run`` reads argv or the environment."""

    catalog: str
    output: str
    bundle: str
    num_shards: int
    batch_size: int
    device: str
    index_factory: str | None
    nprobe: int | None
    train_sample_size: int
    feature_shards: int
    run_id: str
    full: bool = False
    rehash: bool = False
    keep_generations: int = 3
    max_error_rate: float = 1.0
    binary_factory: str | None = None
    max_index_memory: int | None = None

    @classmethod
    def from_options(cls, options: PipelineOptions) -> IndexConfig:
        o = options.view_as(IndexOptions)
        missing = [f"--{name}" for name in ("catalog", "output", "bundle") if not getattr(o, name)]
        if missing:
            raise ValueError(f"required: {', '.join(missing)}")
        catalog_format(o.catalog)  # fail now on an unknown extension, not on a worker
        if not rio.exists(o.catalog):
            raise FileNotFoundError(f"--catalog {o.catalog} does not exist")
        for name in ("num_shards", "batch_size", "train_sample_size"):
            if getattr(o, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(o, name)}")
        run_id = o.run_id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
        if not run_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"--run_id {run_id!r}: use letters, digits, '-' and '_' only")
        if o.keep_generations < 1:
            raise ValueError(f"--keep_generations must be >= 1, got {o.keep_generations}")
        if not 0.0 <= o.max_error_rate <= 1.0:
            raise ValueError(f"--max_error_rate must be in [0, 1], got {o.max_error_rate}")
        try:
            max_index_memory = None if o.max_index_memory is None else parse_bytes(o.max_index_memory)
        except ValueError as e:
            raise ValueError(f"--max_index_memory: {e}") from e
        return cls(
            catalog=o.catalog,
            output=o.output.rstrip("/"),
            bundle=o.bundle,
            num_shards=o.num_shards,
            batch_size=o.batch_size,
            device=o.device,
            index_factory=o.index_factory,
            binary_factory=o.binary_factory,
            nprobe=o.nprobe,
            train_sample_size=o.train_sample_size,
            feature_shards=o.feature_shards,
            run_id=run_id,
            full=o.full,
            rehash=o.rehash,
            keep_generations=o.keep_generations,
            max_error_rate=o.max_error_rate,
            max_index_memory=max_index_memory,
        )

    @property
    def generation(self) -> str:
        return self.run_id


def previous_feature_files(config: IndexConfig, bundle: BundleConfig) -> tuple[list[str], int]:
    """Feature files of the published generation that this run may carry rows over from, and how many rows
    they hold (([], 0): a full run)."""
    if config.full:
        return [], 0
    try:
        manifest = load_manifest(config.output)
    except FileNotFoundError:
        return [], 0
    if manifest.model_id != bundle.model_id:
        log.info("published generation used model %s, this run %s: full rebuild", manifest.model_id, bundle.model_id)
        return [], 0
    return [rio.join(config.output, f.path) for f in manifest.feature_files], manifest.ntotal


class _CountNewFn(beam.DoFn):
    """On a full run every catalog row is new; count it so reports read the same either way."""

    def __init__(self) -> None:
        self.new = Metrics.counter("incremental", "new")

    def process(self, row):
        self.new.inc()
        yield row


def build_pipeline(
    p: beam.Pipeline,
    config: IndexConfig,
    bundle: BundleConfig,
    previous: list[str],
    current_generation: int = 0,
    previous_rows: int = 0,
) -> None:
    """Add the whole indexing graph to ``p``.

    ``previous`` are the feature files to carry unchanged rows from (``previous_rows`` rows in all);
    ``current_generation`` is the GCS object generation of ``CURRENT`` when the run started (the
    precondition of the final swap).
    """
    indexed_at = dt.datetime.now(dt.UTC)
    schema = feature_schema(bundle.embedding_dim, bundle.hash_bits)
    generation_rel = f"indices/{config.generation}"

    # An incremental run groups by item id in its join anyway and drops duplicates there.
    rows, bad_rows = p | "ReadCatalog" >> ReadCatalog(config.catalog, config.run_id, dedupe=not previous)
    dead_parts, carried_files = [bad_rows], None
    if previous:
        rows, carried_files, bad_reads = rows | "SkipUnchanged" >> SkipUnchanged(
            previous,
            previous_rows,
            bundle.model_id,
            config.run_id,
            table_prefix(config.output, "features", config.run_id),
            schema,
            rehash=config.rehash,
        )
        dead_parts.append(bad_reads)
    else:
        rows = rows | "AllNew" >> beam.ParDo(_CountNewFn())
    decoded, bad_images = rows | "ReadAndDecode" >> ReadAndDecode(
        bundle.preprocessing, config.run_id, config.batch_size
    )
    features, failed = decoded | "Embed" >> Embed(config.bundle, config.device, config.run_id, indexed_at, schema)
    dead = (*dead_parts, bad_images, failed) | "AllDeadLetters" >> beam.Flatten()

    feature_files = features | "WriteFeatures" >> WriteTable(
        config.output, "features", config.run_id, schema, config.feature_shards, batched=True
    )
    if carried_files is not None:
        feature_files = (feature_files, carried_files) | "WithCarried" >> beam.Flatten()
    dead_files = dead | "WriteDeadLetter" >> WriteTable(
        config.output, "dead_letter", config.run_id, DEAD_LETTER_SCHEMA, 1
    )
    shards, spec = feature_files | "BuildIndex" >> BuildIndex(
        rio.join(config.output, generation_rel),
        generation_rel,
        num_shards=config.num_shards,
        dim=bundle.embedding_dim,
        hash_bits=bundle.hash_bits,
        factory=config.index_factory,
        nprobe=config.nprobe,
        train_sample_size=config.train_sample_size,
        binary_factory=config.binary_factory,
        max_index_memory=config.max_index_memory,
    )
    _ = (shards, spec, feature_files, dead_files) | "Publish" >> Publish(
        max_error_rate=config.max_error_rate,
        current_generation=current_generation,
        output_root=config.output,
        generation=config.generation,
        run_id=config.run_id,
        model_id=bundle.model_id,
        model_name=bundle.model_name,
        dim=bundle.embedding_dim,
        hash_bits=bundle.hash_bits,
    )


def _counters(metrics: dict[str, list]) -> dict[str, int]:
    out = {}
    for c in metrics["counters"]:
        key = f"{c.key.metric.namespace}.{c.key.metric.name}"
        out[key] = out.get(key, 0) + int(c.committed if c.committed is not None else c.attempted)
    return dict(sorted(out.items()))


def check_factories(config: IndexConfig, bundle: BundleConfig) -> None:
    """Refuse a forced faiss factory string faiss cannot build, before any work (ValueError)."""
    for flag, value, make in (
        ("--index_factory", config.index_factory, lambda f: faiss.index_factory(bundle.embedding_dim, f, METRIC)),
        ("--binary_factory", config.binary_factory, lambda f: faiss.index_binary_factory(bundle.hash_bits, f)),
    ):
        if value is not None:
            try:
                make(value)
            except RuntimeError as e:
                reason = str(e).strip().splitlines()[-1].rsplit(".cpp:", 1)[-1].split(": ", 1)[-1]
                raise ValueError(f"{flag} {value!r}: faiss cannot build it ({reason})") from e


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, run the pipeline to completion, write ``runs/<run_id>.json``, and return that report.

    Raises:
        LockedError: another run holds the output root.
        ValueError, FileNotFoundError, BundleError: bad flags or inputs, before any work.
    """
    options = PipelineOptions(argv)
    config = IndexConfig.from_options(options)
    bundle = verify_bundle(config.bundle)  # a corrupt bundle is exit 2 now, not a crash on every worker
    check_factories(config, bundle)
    runner = options.view_as(StandardOptions).runner
    if runner is None or runner in LOCAL_RUNNERS:
        resolve_device(config.device)  # a misspelt --device, or cuda with no GPU: fail now, before any work
    else:
        parse_device(config.device)  # the workers check for the GPU; a misspelt name is exit 2 here all the same
    with OutputLock(config.output, config.run_id):
        previous, previous_rows = previous_feature_files(config, bundle)
        current_generation = rio.object_generation(rio.join(config.output, CURRENT_FILE))
        log.info(
            "run %s: catalog %s -> %s (model %s, %s)",
            config.run_id,
            config.catalog,
            config.output,
            bundle.model_id,
            f"incremental over {len(previous)} feature files" if previous else "full",
        )
        started = time.time()
        with beam.Pipeline(options=options) as p:
            build_pipeline(p, config, bundle, previous, current_generation, previous_rows)
        manifest_path = rio.join(config.output, "indices", config.generation, MANIFEST_FILE)
        manifest = json.loads(rio.read_bytes(manifest_path))
        published = (
            rio.exists(rio.join(config.output, CURRENT_FILE)) and read_current(config.output) == config.generation
        )
        metrics = query_metrics(p.result)
        counters = _counters(metrics)
        counts = {
            "catalog_rows": counters.get("read_catalog.rows", 0),
            **{
                k: counters.get(f"incremental.{k}", 0)
                for k in ("new", "changed", "unchanged", "removed", "hashed", "stamp_hits")
            },
            "failed": manifest["counts"]["dead_letter"],
            **manifest["counts"],
        }
        rate = error_rate(counts["indexed"], counts["dead_letter"])
        report = {
            "run_id": config.run_id,
            "status": "published" if published else "rejected",
            "mode": "incremental" if previous else "full",
            "error_rate": round(rate, 6),
            "config": asdict(config),
            "model_id": bundle.model_id,
            "generation": config.generation,
            "manifest": manifest_path,
            "current": rio.join(config.output, CURRENT_FILE),
            "counts": counts,
            "index": {
                k: manifest[k]
                for k in (
                    "vector_factory",
                    "binary_factory",
                    "nprobe",
                    "embedding_dim",
                    "hash_bits",
                    "index_selection",
                )
            },
            "counters": counters,
            "timings": stage_timings(metrics),
            "wall_s": round(time.time() - started, 3),
        }
        if published:
            report["pruned"] = prune(config.output, config.keep_generations, current_run=config.run_id)
        rio.write_bytes_atomic(
            rio.join(config.output, "runs", f"{config.run_id}.json"),
            (json.dumps(report, indent=2, default=str) + "\n").encode(),
        )
    return report


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_ERROR_RATE = 0, 1, 2, 3, 4


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Exit codes: 0 published, 1 pipeline failed, 2 bad flags or inputs,
    3 another run holds the output, 4 written but not published (error rate above --max_error_rate)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    if "-h" in argv or "--help" in argv:  # PipelineOptions would swallow --help; show our flags
        parser = argparse.ArgumentParser(
            prog="retrieval-index",
            description=__doc__.split("\n\n")[0],
            epilog="Every other flag is a standard Beam pipeline option (--runner, --temp_location, --project, ...).",
        )
        IndexOptions._add_argparse_args(parser)
        parser.print_help()
        return EXIT_OK
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run(argv)
    except LockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except (ValueError, FileNotFoundError, CatalogError) as e:  # BundleError and ManifestError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    c = report["counts"]
    print(
        f"run {report['run_id']} ({report['mode']}): {c['indexed']} indexed "
        f"(new {c['new']}, changed {c['changed']}, unchanged {c['unchanged']}, removed {c['removed']}), "
        f"{c['dead_letter']} dead-letter rows, {report['wall_s']:.1f} s"
    )
    if report["status"] != "published":
        print(
            f"NOT published: error rate {report['error_rate']:.3f} > --max_error_rate "
            f"{report['config']['max_error_rate']}; CURRENT still names the previous generation. "
            f"Inspect {report['manifest']} and the dead-letter table.",
            file=sys.stderr,
        )
        return EXIT_ERROR_RATE
    print(f"published {report['manifest']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
