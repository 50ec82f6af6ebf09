"""Index a catalog: images -> embeddings and hash codes -> Parquet features + sharded FAISS indices.

    python -m pipelines.index_catalog --catalog catalog.csv --output out/ --bundle bundles/baseline \\
        --runner apache_beam.runners.portability.fn_api_runner.FnApiRunner

Any standard Beam flag (``--runner``, ``--temp_location``, ``--project``, ...) is
passed to the runner. The graph: ReadCatalog -> ReadAndDecode -> Embed
(RunInference) -> WriteFeatures / WriteDeadLetter -> BuildIndex -> Publish.
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
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.transforms.build_index import BuildIndex
from pipelines.transforms.catalog import ReadCatalog, catalog_format
from pipelines.transforms.decode import ReadAndDecode
from pipelines.transforms.inference import Embed
from pipelines.transforms.publish import Publish
from pipelines.transforms.write import WriteTable
from retrieval_core import io as rio
from retrieval_core.bundle import BundleConfig, read_bundle_config
from retrieval_core.encoder import resolve_device
from retrieval_core.index.publish import CURRENT_FILE, MANIFEST_FILE
from schemas import DEAD_LETTER_SCHEMA, feature_schema

log = logging.getLogger("index_catalog")

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
        parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="inference device")
        parser.add_argument(
            "--index_factory",
            default=None,
            help="force a faiss factory string (default: chosen from the number of vectors)",
        )
        parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed at query time")
        parser.add_argument("--train_sample_size", type=int, default=65536, help="vectors sampled to train the index")
        parser.add_argument(
            "--feature_shards", type=int, default=0, help="Parquet files per run (0: let the runner decide)"
        )
        parser.add_argument("--run_id", default=None, help="run id (default: UTC timestamp + random suffix)")


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
        return cls(
            o.catalog,
            o.output.rstrip("/"),
            o.bundle,
            o.num_shards,
            o.batch_size,
            o.device,
            o.index_factory,
            o.nprobe,
            o.train_sample_size,
            o.feature_shards,
            run_id,
        )

    @property
    def generation(self) -> str:
        return self.run_id


def build_pipeline(p: beam.Pipeline, config: IndexConfig, bundle: BundleConfig) -> None:
    """Add the whole indexing graph to ``p``."""
    indexed_at = dt.datetime.now(dt.UTC)
    schema = feature_schema(bundle.embedding_dim, bundle.hash_bits)
    generation_rel = f"indices/{config.generation}"

    rows, bad_rows = p | "ReadCatalog" >> ReadCatalog(config.catalog, config.run_id)
    decoded, bad_images = rows | "ReadAndDecode" >> ReadAndDecode(bundle.preprocessing, config.run_id)
    features, failed = decoded | "Embed" >> Embed(
        config.bundle, config.device, config.batch_size, config.run_id, indexed_at
    )
    dead = (bad_rows, bad_images, failed) | "AllDeadLetters" >> beam.Flatten()

    feature_files = features | "WriteFeatures" >> WriteTable(
        config.output, "features", config.run_id, schema, config.feature_shards
    )
    dead_files = dead | "WriteDeadLetter" >> WriteTable(
        config.output, "dead_letter", config.run_id, DEAD_LETTER_SCHEMA, 1
    )
    dead_count = dead | "CountDeadLetters" >> beam.combiners.Count.Globally()
    shards, spec = features | "BuildIndex" >> BuildIndex(
        rio.join(config.output, generation_rel),
        generation_rel,
        num_shards=config.num_shards,
        dim=bundle.embedding_dim,
        hash_bits=bundle.hash_bits,
        factory=config.index_factory,
        nprobe=config.nprobe,
        train_sample_size=config.train_sample_size,
    )
    _ = (shards, spec, feature_files, dead_files, dead_count) | "Publish" >> Publish(
        output_root=config.output,
        generation=config.generation,
        run_id=config.run_id,
        model_id=bundle.model_id,
        model_name=bundle.model_name,
        dim=bundle.embedding_dim,
        hash_bits=bundle.hash_bits,
    )


def _counters(result) -> dict[str, int]:
    out = {}
    for c in result.metrics().query()["counters"]:
        key = f"{c.key.metric.namespace}.{c.key.metric.name}"
        out[key] = out.get(key, 0) + int(c.committed if c.committed is not None else c.attempted)
    return dict(sorted(out.items()))


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, run the pipeline to completion, write ``runs/<run_id>.json``, and return that report."""
    options = PipelineOptions(argv)
    config = IndexConfig.from_options(options)
    bundle = read_bundle_config(config.bundle)
    runner = options.view_as(StandardOptions).runner
    if runner is None or runner in LOCAL_RUNNERS:
        resolve_device(config.device)  # --device cuda with no GPU: fail now, before any work
    log.info("run %s: catalog %s -> %s (model %s)", config.run_id, config.catalog, config.output, bundle.model_id)
    started = time.time()
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, config, bundle)
    result = p.result
    manifest_path = rio.join(config.output, "indices", config.generation, MANIFEST_FILE)
    manifest = json.loads(rio.read_bytes(manifest_path))
    report = {
        "run_id": config.run_id,
        "status": "published",
        "config": asdict(config),
        "model_id": bundle.model_id,
        "generation": config.generation,
        "manifest": manifest_path,
        "current": rio.join(config.output, CURRENT_FILE),
        "counts": {"catalog_rows": _counter(result, "read_catalog.rows"), **manifest["counts"]},
        "index": {k: manifest[k] for k in ("vector_factory", "binary_factory", "nprobe", "embedding_dim", "hash_bits")},
        "counters": _counters(result),
        "wall_s": round(time.time() - started, 3),
    }
    rio.write_bytes_atomic(
        rio.join(config.output, "runs", f"{config.run_id}.json"),
        (json.dumps(report, indent=2, default=str) + "\n").encode(),
    )
    return report


def _counter(result, name: str) -> int:
    return _counters(result).get(name, 0)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(argv if argv is not None else sys.argv[1:])
    c = report["counts"]
    print(
        f"run {report['run_id']}: {c['indexed']} indexed, {c['dead_letter']} dead-letter rows "
        f"(of {c['catalog_rows']} parsed catalog rows) in {report['wall_s']:.1f} s"
    )
    print(f"published {report['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
