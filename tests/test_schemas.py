"""Schemas and the manifest: round trips, and validation that refuses what it should."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import feature_rows

from schemas import (
    DEAD_LETTER_SCHEMA,
    SCHEMA_VERSION,
    FileEntry,
    Manifest,
    ManifestError,
    check_schema_version,
    feature_schema,
)

SHA = "a" * 64


def test_feature_table_round_trip(tmp_path):
    schema = feature_schema(8, 16)
    rows = feature_rows(3, 8, 16)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, tmp_path / "f.parquet")
    back = pq.read_table(tmp_path / "f.parquet")
    assert back.schema.remove_metadata().equals(schema.remove_metadata())
    assert back.schema.metadata == schema.metadata
    assert check_schema_version(back.schema.metadata, what="f") == SCHEMA_VERSION
    assert back.column("embedding").type == pa.list_(pa.float32(), 8)
    assert back.to_pylist()[2]["hash_code"] == bytes([2, 2])
    assert dict(back.to_pylist()[0]["attributes"]) == {"colour": "red"}


def test_feature_schema_rejects_bad_sizes():
    with pytest.raises(ValueError):
        feature_schema(0, 64)
    with pytest.raises(ValueError):
        feature_schema(128, 60)


def test_wrong_embedding_length_is_refused():
    rows = feature_rows(1, 7, 16)
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, ValueError)):
        pa.Table.from_pylist(rows, schema=feature_schema(8, 16))


def test_dead_letter_round_trip(tmp_path):
    row = {
        "item_id": None,
        "image_uri": "x",
        "stage": "decode",
        "error_type": "empty",
        "error_message": "zero",
        "row_json": "{}",
        "run_id": "r",
        "at": dt.datetime.now(dt.UTC),
    }
    pq.write_table(pa.Table.from_pylist([row], schema=DEAD_LETTER_SCHEMA), tmp_path / "d.parquet")
    assert pq.read_table(tmp_path / "d.parquet").to_pylist()[0]["item_id"] is None


def test_schema_version_check():
    assert check_schema_version({b"schema_version": b"1.7.0"}, what="x") == "1.7.0"
    with pytest.raises(ValueError, match="incompatible"):
        check_schema_version({b"schema_version": b"2.0.0"}, what="x")
    with pytest.raises(ValueError, match="no schema_version"):
        check_schema_version(None, what="x")


def shards(kind: str) -> tuple[FileEntry, ...]:
    return tuple(
        FileEntry(f"indices/g/{kind}/s{i}", SHA, 10, rows=r, offset=o) for i, (r, o) in enumerate([(3, 0), (2, 3)])
    )


def make_manifest(**overrides) -> Manifest:
    fields = dict(
        generation="g",
        run_id="g",
        created_at="2026-01-01T00:00:00+00:00",
        model_id="m-1",
        model_name="baseline_cnn",
        embedding_dim=128,
        hash_bits=64,
        metric="inner_product",
        vector_factory="Flat",
        binary_factory="BFlat",
        nprobe=1,
        vector_shards=shards("vectors"),
        hamming_shards=shards("hamming"),
        id_files=shards("ids"),
        counts={"indexed": 5},
    )
    return Manifest(**{**fields, **overrides})


def test_manifest_round_trip():
    m = make_manifest().validate()
    back = Manifest.from_json(m.to_json())
    assert back == m and back.ntotal == 5 and back.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_id=""), "no model_id"),
        (dict(hash_bits=60), "bad dimensions"),
        (dict(metric="cosine"), "metric"),
        (dict(counts={"indexed": 6}), "counts.indexed"),
        (dict(hamming_shards=()), "shard lists disagree"),
        (dict(schema_version="2.0.0"), "incompatible"),
    ],
)
def test_manifest_validation(change, message):
    with pytest.raises(ManifestError, match=message):
        make_manifest(**change).validate()


def test_manifest_rejects_bad_entries():
    m = make_manifest()
    bad_sha = dataclasses.replace(m.vector_shards[0], sha256="xyz")
    with pytest.raises(ManifestError, match="64 hex"):
        dataclasses.replace(m, vector_shards=(bad_sha, m.vector_shards[1])).validate()
    escape = dataclasses.replace(m.id_files[0], path="../../etc/passwd")
    with pytest.raises(ManifestError, match="relative"):
        dataclasses.replace(m, id_files=(escape, m.id_files[1])).validate()
    gap = dataclasses.replace(m.vector_shards[1], offset=4)
    with pytest.raises(ManifestError, match="offset"):
        dataclasses.replace(m, vector_shards=(m.vector_shards[0], gap)).validate()


def test_manifest_from_bad_json():
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json("{")
    with pytest.raises(ManifestError, match="unknown manifest keys"):
        Manifest.from_json(make_manifest().to_json().replace('"nprobe"', '"nprobes"'))


def test_manifest_of_a_newer_minor_version_is_read_without_its_additions():
    major, minor, _ = SCHEMA_VERSION.split(".")
    raw = json.loads(make_manifest(index_selection={"max_index_memory": 1024, "estimated_bytes": 640}).to_json())
    newer = {**raw, "schema_version": f"{major}.{int(minor) + 1}.0", "added_later": {"x": 1}}
    back = Manifest.from_json(json.dumps(newer))
    assert back.index_selection == {"max_index_memory": 1024, "estimated_bytes": 640}
    assert back.vector_shards == make_manifest().vector_shards
    for version in (SCHEMA_VERSION, f"{major}.0.0"):  # written by this release or an older one: a typo
        with pytest.raises(ManifestError, match="unknown manifest keys"):
            Manifest.from_json(json.dumps({**raw, "schema_version": version, "added_later": 1}))
    with pytest.raises(ManifestError, match="incompatible"):
        Manifest.from_json(json.dumps({**raw, "schema_version": f"{int(major) + 1}.0.0", "added_later": 1}))
