"""The indexing pipeline end to end on the local runner, against what the catalog says should happen."""

from __future__ import annotations

import glob
import json
import os

import duckdb
import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import pipeline_flags, write_catalog

from pipelines.index_catalog import run
from retrieval_core.index.publish import load_manifest, read_current
from retrieval_core.search import Searcher
from schemas import DEAD_LETTER_SCHEMA, ManifestError, check_schema_version, feature_schema


def _run(catalog: str, out: str, bundle: str, *extra: str) -> dict:
    return run(pipeline_flags(catalog, out, bundle, "--num_shards=3", "--batch_size=8", *extra))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("pipeline")
    catalog, expect = write_catalog(str(root / "catalog"), 24)
    out = str(root / "out")
    report = _run(catalog, out, tiny_bundle[0], "--run_id=r1")
    return out, expect, report, tiny_bundle


def test_every_row_accounted_for(indexed):
    out, expect, report, (_, bundle) = indexed
    features = pq.read_table(glob.glob(f"{out}/features/run=r1/*.parquet"))
    dead = pq.read_table(glob.glob(f"{out}/dead_letter/run=r1/*.parquet"))
    assert sorted(features.column("item_id").to_pylist()) == sorted(expect["good"])
    dead_ids = dead.column("item_id").to_pylist()
    assert sorted(i for i in dead_ids if i and i.startswith("bad-")) == sorted(expect["bad"])
    assert len(dead) == len(expect["bad"]) + expect["catalog_errors"]
    assert report["counts"]["indexed"] == len(expect["good"])
    assert report["counts"]["dead_letter"] == len(dead)
    # Per-stage timings: one decode per readable image (good ones and the four undecodable ones).
    decodable_or_not = len(expect["good"]) + len(expect["bad"]) - 1  # the missing file is never decoded
    assert report["timings"]["read_and_decode.decode"]["count"] == decodable_or_not
    assert report["timings"]["build_index.fill_and_write_shard"]["count"] == 3
    # The duplicate item_id keeps its first row (good000.jpg), the later one is dead-lettered.
    row = next(r for r in features.to_pylist() if r["item_id"] == "item000")
    assert row["image_uri"].endswith("good000.jpg")
    stages = {(r["item_id"], r["stage"], r["error_type"]) for r in dead.to_pylist()}
    assert ("bad-missing", "read", "not_found") in stages
    assert ("bad-zero", "decode", "empty") in stages
    assert ("bad-html", "decode", "not_an_image") in stages
    assert ("bad-truncated", "decode", "truncated") in stages
    assert ("item000", "read_catalog", "duplicate_item_id") in stages


def test_tables_match_schemas(indexed):
    out, _, _, (_, bundle) = indexed
    for path in glob.glob(f"{out}/features/run=r1/*.parquet"):
        schema = pq.read_schema(path)
        check_schema_version(schema.metadata, what=path)
        assert schema.remove_metadata() == feature_schema(bundle.embedding_dim, bundle.hash_bits).remove_metadata()
    for path in glob.glob(f"{out}/dead_letter/run=r1/*.parquet"):
        assert pq.read_schema(path).remove_metadata() == DEAD_LETTER_SCHEMA.remove_metadata()


def test_published_index(indexed):
    out, expect, _, (bundle_dir, bundle) = indexed
    assert read_current(out) == "r1"
    manifest = load_manifest(out)
    assert manifest.model_id == bundle.model_id and manifest.ntotal == len(expect["good"])
    assert len(manifest.vector_shards) == 3
    # Plain faiss opens every shard; ntotal adds up to the feature rows.
    total = sum(faiss.read_index(os.path.join(out, s.path)).ntotal for s in manifest.vector_shards)
    btotal = sum(faiss.read_index_binary(os.path.join(out, s.path)).ntotal for s in manifest.hamming_shards)
    assert total == btotal == len(expect["good"])
    assert json.load(open(os.path.join(out, "runs", "r1.json")))["status"] == "published"
    # The generation folder holds the manifest and what it lists, nothing else: BuildIndex's part files are gone.
    on_disk = {
        os.path.relpath(os.path.join(d, f), out)
        for d, _, files in os.walk(os.path.join(out, "indices", "r1"))
        for f in files
    }
    listed = {s.path for s in (*manifest.vector_shards, *manifest.hamming_shards, *manifest.id_files)}
    assert on_disk == listed | {"indices/r1/manifest.json"}


def test_indexed_image_finds_itself_first(indexed):
    out, expect, _, (bundle_dir, _) = indexed
    searcher = Searcher.open(out, bundle=bundle_dir)
    images = [os.path.join(os.path.dirname(out), "catalog", "images", f"good{i:03d}.jpg") for i in (3, 10, 17)]
    result = searcher.search_images(images, k=3)
    assert [r[0] for r in result.item_ids] == ["item003", "item010", "item017"]
    assert np.allclose(result.scores[:, 0], 1.0, atol=1e-4)
    by_item = searcher.search_items(["item005"], k=1)
    assert by_item.item_ids[0][0] == "item005"
    by_code = searcher.search_items(["item005"], k=1, mode="hamming")
    assert by_code.scores[0][0] == 0


def test_checksum_mismatch_is_refused(indexed, tmp_path):
    import shutil

    out, _, _, _ = indexed
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    manifest = load_manifest(copy)
    shard = os.path.join(copy, manifest.vector_shards[0].path)
    with open(shard, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match="failed verification"):
        Searcher.open(copy)


def test_duckdb_reads_features_with_documented_query(indexed):
    out, _, _, _ = indexed
    con = duckdb.connect()
    rows = con.sql(f"""
        WITH f AS (SELECT * FROM read_parquet('{out}/features/*/*.parquet', hive_partitioning = true))
        SELECT b.item_id, list_cosine_similarity(a.embedding, b.embedding) AS cosine
        FROM f a, f b WHERE a.item_id = 'item004' AND b.item_id <> a.item_id
        ORDER BY cosine DESC LIMIT 3""").fetchall()
    assert len(rows) == 3 and all(-1.0001 <= c <= 1.0001 for _, c in rows)


def test_cuda_without_gpu_fails_at_start(tmp_path, tiny_bundle):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    catalog, _ = write_catalog(str(tmp_path / "c"), 2, broken=False, duplicate=False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _run(catalog, str(tmp_path / "out"), tiny_bundle[0], "--device=cuda")
    assert not os.path.exists(tmp_path / "out" / "CURRENT")


def test_a_misspelt_device_is_refused_before_any_work_on_any_runner(tmp_path, tiny_bundle):
    catalog, _ = write_catalog(str(tmp_path / "c"), 2, broken=False, duplicate=False)
    for runner in ("--runner=DataflowRunner", "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"):
        argv = [f"--catalog={catalog}", f"--output={tmp_path / 'out'}", f"--bundle={tiny_bundle[0]}", runner]
        with pytest.raises(ValueError, match="unknown device 'gpu'"):
            run([*argv, "--device=gpu"])
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_catalogs_with_ivf_index(tmp_path, tiny_bundle, fmt):
    """The same catalog as JSONL or Parquet indexes the same items; an IVF factory trains inside the graph."""
    import csv

    import pyarrow as pa

    csv_path, expect = write_catalog(str(tmp_path / "c"), 12, duplicate=False)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    path = os.path.join(os.path.dirname(csv_path), f"catalog.{fmt}")
    if fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    out = str(tmp_path / "out")
    report = _run(path, out, tiny_bundle[0], "--index_factory=IVF4,Flat", "--nprobe=4", "--binary_factory=BHash3x5")
    assert report["counts"]["indexed"] == len(expect["good"])
    assert report["counts"]["dead_letter"] == len(expect["bad"])
    searcher = Searcher.open(out)
    assert (searcher.manifest.vector_factory, searcher.manifest.binary_factory) == ("IVF4,Flat", "BHash3x5")
    assert isinstance(faiss.read_index(os.path.join(out, searcher.manifest.vector_shards[0].path)), faiss.IndexIVFFlat)
    hamming_shard = faiss.read_index_binary(os.path.join(out, searcher.manifest.hamming_shards[0].path))
    assert isinstance(hamming_shard, faiss.IndexBinaryMultiHash)
    result = searcher.search_items(expect["good"], k=1)  # nprobe = nlist: exact, so each item finds itself
    assert [r[0] for r in result.item_ids] == expect["good"]
    _, codes = searcher.features_of(expect["good"])
    within = searcher.search_codes_within(codes, 0)
    assert all(item in ids and not d.any() for item, (ids, d) in zip(expect["good"], within))


@pytest.mark.parametrize("flag", ["--index_factory=IVFx", "--binary_factory=BNope"])
def test_a_factory_faiss_cannot_build_is_refused_before_any_work(tmp_path, tiny_bundle, flag):
    catalog, _ = write_catalog(str(tmp_path / "c"), 2, broken=False, duplicate=False)
    with pytest.raises(ValueError, match=f"{flag.split('=')[0]} .*faiss cannot build it"):
        _run(catalog, str(tmp_path / "out"), tiny_bundle[0], flag)
    assert not os.path.exists(tmp_path / "out")


def test_inference_failure_becomes_dead_letters(tmp_path, tiny_bundle, monkeypatch):
    """A batch the model cannot run is dead-lettered row by row; the run still publishes (an empty index)."""
    from retrieval_core.encoder import Encoder

    def broken_encode(self, pixels, row_errors=False):
        raise ValueError("simulated: the model cannot take this batch")

    monkeypatch.setattr(Encoder, "encode", broken_encode)
    catalog, expect = write_catalog(str(tmp_path / "c"), 5, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    report = _run(catalog, out, tiny_bundle[0])
    dead = pq.read_table(glob.glob(f"{out}/dead_letter/*/*.parquet")).to_pylist()
    assert sorted(r["item_id"] for r in dead) == expect["good"]
    assert {(r["stage"], r["error_type"]) for r in dead} == {("inference", "ValueError")}
    assert {r["error_message"] for r in dead} == {"ValueError('simulated: the model cannot take this batch')"}
    assert report["counts"]["indexed"] == 0
    assert Searcher.open(out).search_vectors(np.zeros((1, 16), np.float32), k=3).item_ids == [[None] * 3]


def test_a_device_failure_fails_the_run_and_publishes_nothing(tmp_path, tiny_bundle, monkeypatch):
    """Out of (GPU) memory is not the batch's fault: no dead letters, the run fails, CURRENT keeps the last
    generation (the runner would retry the bundle; the local one gives up)."""
    import torch

    from retrieval_core.encoder import Encoder

    catalog, _ = write_catalog(str(tmp_path / "c"), 5, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    assert _run(catalog, out, tiny_bundle[0], "--run_id=good")["status"] == "published"

    def out_of_memory(self, pixels, row_errors=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Encoder, "encode", out_of_memory)
    with pytest.raises(Exception, match="CUDA out of memory"):
        _run(catalog, out, tiny_bundle[0], "--run_id=oom", "--full")
    assert read_current(out) == "good"
    assert not os.path.exists(os.path.join(out, "indices", "oom", "manifest.json"))
    assert not glob.glob(f"{out}/dead_letter/run=oom/*.parquet")


def test_memory_budget_is_recorded_and_one_nothing_fits_is_refused(tmp_path, tiny_bundle):
    catalog, expect = write_catalog(str(tmp_path / "c"), 6, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    report = _run(catalog, out, tiny_bundle[0], "--max_index_memory=1K")
    flat_bytes = 6 * 16 * 4  # six 16-d float32 vectors, exact
    assert report["index"]["index_selection"] == {"max_index_memory": 1024, "estimated_bytes": flat_bytes}
    searcher = Searcher.open(out)
    assert searcher.manifest.index_selection == report["index"]["index_selection"]
    assert searcher.manifest.vector_factory == "Flat"
    with pytest.raises(ValueError, match="--max_index_memory: 'lots' is not a size"):
        _run(catalog, str(tmp_path / "bad"), tiny_bundle[0], "--max_index_memory=lots")
    assert not os.path.exists(tmp_path / "bad")
    # Below what the smallest index needs: the run fails and publishes nothing.
    with pytest.raises(ValueError, match="no index of 6 x 16 vectors fits"):
        _run(catalog, str(tmp_path / "small"), tiny_bundle[0], "--max_index_memory=100")
    assert not os.path.exists(tmp_path / "small" / "CURRENT")


def test_a_runner_without_metrics_still_gets_a_report():
    """Beam's DaskRunner raises NotImplementedError from metrics(): the report then has empty counters."""
    from pipelines.index_catalog import _counters
    from pipelines.transforms.timing import query_metrics, stage_timings

    class NoMetrics:
        def metrics(self):
            raise NotImplementedError("collecting metrics will come later!")

    metrics = query_metrics(NoMetrics())
    assert _counters(metrics) == {} and stage_timings(metrics) == {}
