"""The pipeline moves images as batches from decoding to the Parquet writer: cut, encoded and written right."""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that
from conftest import feature_rows, write_catalog

from pipelines.transforms.catalog import normalise_row
from pipelines.transforms.decode import ReadAndDecode
from pipelines.transforms.inference import feature_batch
from pipelines.transforms.write import ArrowTableCoder, WriteTable
from retrieval_core.encoder import EncodedBatch
from retrieval_core.preprocess import Preprocessing, load_image_file
from schemas import check_schema_version, feature_schema

FN_API = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def _catalog_rows(root: str) -> tuple[list[dict], dict]:
    path, expect = write_catalog(root, 11, duplicate=False)
    with open(path) as f:
        header, *lines = [line.strip().split(",") for line in f]
    rows = [normalise_row(dict(zip(header, values)), root)[0] for values in lines]
    return rows, expect


def test_read_and_decode_cuts_batches_and_dead_letters_each_bad_image(tmp_path):
    rows, expect = _catalog_rows(str(tmp_path))
    prep = Preprocessing(image_size=16)
    files = {r["item_id"]: r["image_uri"] for r in rows}

    # One bundle in catalog order: chunks are rows[0:4], rows[4:8], ...; each batch is its chunk's good images.
    good = set(expect["good"])
    chunk_ids = [[r["item_id"] for r in rows[i : i + 4]] for i in range(0, len(rows), 4)]
    expected_batches = [[i for i in ids if i in good] for ids in chunk_ids]
    expected_batches = [ids for ids in expected_batches if ids]
    assert len(expected_batches) >= 3 and any(len(ids) < 4 for ids in expected_batches)

    def check_batches(batches):
        assert all(len(metas) == len(pixels) for metas, pixels in batches)
        assert sorted([m["item_id"] for m in metas] for metas, _ in batches) == sorted(expected_batches)
        seen = [m["item_id"] for metas, _ in batches for m in metas]
        assert sorted(seen) == sorted(expect["good"])  # every good image once, no bad one
        for metas, pixels in batches:
            for meta, image in zip(metas, pixels):
                path = files[meta["item_id"]]
                assert meta["image_uri"] == path
                assert meta["content_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
                assert meta["catalog"] == {"product_id": meta["catalog"]["product_id"]}
                np.testing.assert_array_equal(image, load_image_file(path, prep).pixels)

    def check_dead(dead):
        assert sorted(d["item_id"] for d in dead) == sorted(expect["bad"])
        by_id = {d["item_id"]: (d["stage"], d["error_type"]) for d in dead}
        assert by_id["bad-missing"] == ("read", "not_found") and by_id["bad-zero"] == ("decode", "empty")

    with beam.Pipeline(FN_API) as p:
        batches, dead = p | beam.Create(rows, reshuffle=False) | ReadAndDecode(prep, "r1", batch_size=4)
        assert_that(batches, check_batches, label="batches")
        assert_that(dead, check_dead, label="dead")


def test_read_and_decode_refuses_an_empty_batch_size():
    with pytest.raises(ValueError, match="batch_size and remote_threads must be >= 1"):
        ReadAndDecode(Preprocessing(image_size=16), "r1", batch_size=0)


def _encoded(n: int, dim: int, bits: int, seed: int = 0) -> EncodedBatch:
    rng = np.random.default_rng(seed)
    return EncodedBatch(
        rng.normal(size=(n, dim)).astype(np.float32),
        rng.integers(0, 256, (n, bits // 8), dtype=np.uint8),
        [f"cat{i % 3}" for i in range(n)],
        rng.random(n).astype(np.float32),
        [{"colour": f"c{i}", "sleeve": "long"} for i in range(n)],
    )


@pytest.mark.parametrize("rows", [None, [0, 2, 3]])
def test_feature_batch_equals_the_rows_built_one_by_one(rows):
    dim, bits, n = 8, 16, 5
    schema = feature_schema(dim, bits)
    encoded = _encoded(n, dim, bits)
    at = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    metas = [
        {
            "item_id": f"i{i}",
            "image_uri": f"gs://b/{i}.jpg",
            "content_sha256": f"{i:064x}",
            "source_stamp": f"gen:{i}",
            "width": 10 + i,
            "height": 20 + i,
            "catalog": {"product_id": f"p{i}", "brand": "x"},
        }
        for i in range(n)
    ]
    oracle = [  # the row dict of each image, as the pipeline built them one at a time before batching
        {
            **{k: m[k] for k in ("item_id", "image_uri", "content_sha256", "source_stamp", "width", "height")},
            "model_id": "m1",
            "embedding": encoded.embeddings[i].tolist(),
            "hash_code": encoded.codes[i].tobytes(),
            "category": encoded.category[i],
            "category_score": float(encoded.category_score[i]),
            "attributes": sorted(encoded.attributes[i].items()),
            "catalog": sorted(m["catalog"].items()),
            "run_id": "r1",
            "indexed_at": at,
        }
        for i, m in enumerate(metas)
        if rows is None or i in rows
    ]
    got = feature_batch(metas, encoded, "m1", "r1", at, schema, rows)
    assert got.schema == schema
    assert pa.Table.from_batches([got]).equals(pa.Table.from_pylist(oracle, schema))


def test_batched_write_coalesces_row_groups_and_keeps_the_schema(tmp_path):
    dim, bits = 4, 16
    schema = feature_schema(dim, bits)
    rows = feature_rows(70, dim, bits)
    batches = [pa.RecordBatch.from_pylist(rows[i : i + 7], schema) for i in range(0, 70, 7)]
    out = str(tmp_path / "out")
    with beam.Pipeline(FN_API) as p:
        # Row groups of at least 3 batches: 21 + 21 + 21 + the last 7.
        _ = p | beam.Create(batches) | WriteTable(out, "features", "r1", schema, 1, True, 3 * batches[0].nbytes)
    (path,) = glob.glob(os.path.join(out, "features", "run=r1", "*.parquet"))
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [21, 21, 21, 7]
    table = pq.read_table(path)
    check_schema_version(table.schema.metadata, what=path)
    assert table.to_pylist() == pa.Table.from_pylist(rows, schema).to_pylist()


def test_arrow_table_coder_round_trips_and_sizes_without_encoding():
    dim, bits = 4, 16
    table = pa.Table.from_pylist(feature_rows(9, dim, bits), feature_schema(dim, bits))
    coder = ArrowTableCoder()
    back = coder.decode(coder.encode(table))
    assert back.equals(table) and back.schema.metadata == table.schema.metadata
    assert coder.estimate_size(table) == table.nbytes
    assert beam.coders.registry.get_coder(pa.Table).__class__ is ArrowTableCoder
