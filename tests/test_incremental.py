"""Nightly runs: incremental work, the output lock, retention, and the error-rate gate."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LOCAL_RUNNER, feature_rows, jpeg_bytes, pipeline_flags, write_catalog

from pipelines.index_catalog import EXIT_ERROR_RATE, EXIT_LOCKED, EXIT_USAGE, main, run
from pipelines.lifecycle import LOCK_FILE, LockedError
from pipelines.transforms import incremental
from retrieval_core import io as rio
from retrieval_core.index.publish import read_current
from retrieval_core.search import Searcher


def _run(catalog: str, out: str, bundle: str, run_id: str, *extra: str) -> dict:
    return run(pipeline_flags(catalog, out, bundle, "--num_shards=2", f"--run_id={run_id}", *extra))


def features(out: str, run_id: str) -> dict[str, dict]:
    table = pq.read_table(glob.glob(f"{out}/features/run={run_id}/*.parquet"))
    return {r["item_id"]: r for r in table.to_pylist()}


def edit_catalog(catalog: str) -> None:
    """Day two: 2 images change, 2 items are removed, 2 items are added."""
    root = os.path.dirname(catalog)
    for i in (1, 2):
        with open(os.path.join(root, "images", f"good{i:03d}.jpg"), "wb") as f:
            f.write(jpeg_bytes(1000 + i))
    lines = open(catalog).read().splitlines()
    kept = [ln for ln in lines if not ln.startswith(("item003,", "item004,"))]
    for i in (50, 51):
        with open(os.path.join(root, "images", f"new{i}.jpg"), "wb") as f:
            f.write(jpeg_bytes(i))
        kept.append(f"item{i:03d},images/new{i}.jpg,p{i}")
    with open(catalog, "w") as f:
        f.write("\n".join(kept) + "\n")


@pytest.mark.parametrize("rows_per_partition", [20_000, 3], ids=["one-partition", "many-partitions"])
def test_incremental_run_equals_a_full_run(tmp_path, tiny_bundle, monkeypatch, rows_per_partition):
    monkeypatch.setattr(incremental, "ROWS_PER_PARTITION", rows_per_partition)  # 3: 7 partitions for 20 items
    monkeypatch.setattr(rio, "RACY_NS", 0)  # trust the stamps of images written a moment ago
    bundle = tiny_bundle[0]
    catalog, _ = write_catalog(str(tmp_path / "c"), 20, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    first = _run(catalog, out, bundle, "day1")
    assert first["mode"] == "full" and first["counts"]["new"] == 20
    edit_catalog(catalog)

    second = _run(catalog, out, bundle, "day2")
    c = second["counts"]
    assert second["mode"] == "incremental"
    assert (c["new"], c["changed"], c["unchanged"], c["removed"]) == (2, 2, 16, 2)
    assert (c["hashed"], c["stamp_hits"]) == (4, 16)  # unchanged images were not even read
    # Only new and changed images were decoded and embedded.
    assert second["counters"]["read_and_decode.decoded"] == 4
    assert second["counters"]["inference.images"] == 4

    full = _run(catalog, str(tmp_path / "full"), bundle, "ref", "--full")
    assert full["mode"] == "full" and full["counters"]["read_and_decode.decoded"] == 20
    inc, ref = features(out, "day2"), features(str(tmp_path / "full"), "ref")
    assert sorted(inc) == sorted(ref)  # removed items gone, new ones in
    for item in ref:
        np.testing.assert_allclose(inc[item]["embedding"], ref[item]["embedding"], atol=1e-5)
        assert inc[item]["hash_code"] == ref[item]["hash_code"]
        assert inc[item]["content_sha256"] == ref[item]["content_sha256"]
        assert inc[item]["source_stamp"] == ref[item]["source_stamp"] == rio.source_stamp(inc[item]["image_uri"])
        assert inc[item]["run_id"] == "day2"
    # Unchanged rows keep the time they were embedded; re-embedded ones get this run's.
    day1 = features(out, "day1")
    assert inc["item010"]["indexed_at"] == day1["item010"]["indexed_at"]
    assert inc["item001"]["indexed_at"] > day1["item001"]["indexed_at"]
    # The served index answers exactly as the full rebuild does.
    a, b = Searcher.open(out), Searcher.open(str(tmp_path / "full"))
    assert a.ntotal == b.ntotal == 20
    assert a.search_items(sorted(ref), k=3).item_ids == b.search_items(sorted(ref), k=3).item_ids


def same_size_edit(path: str, seed: int) -> None:
    """Replace an image's content keeping its size and mtime (JPEG decoders ignore bytes after the end marker)."""
    st = os.stat(path)
    data = jpeg_bytes(seed)
    assert len(data) <= st.st_size
    with open(path, "r+b") as f:
        f.write(data + b"\0" * (st.st_size - len(data)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_source_stamps_skip_reads_and_still_catch_every_edit(tmp_path, tiny_bundle, monkeypatch):
    monkeypatch.setattr(rio, "RACY_NS", 0)
    catalog, expect = write_catalog(str(tmp_path / "c"), 6, broken=False, duplicate=False)
    out, bundle = str(tmp_path / "out"), tiny_bundle[0]
    _run(catalog, out, bundle, "d1")

    c = _run(catalog, out, bundle, "d2")["counts"]
    assert (c["unchanged"], c["stamp_hits"], c["hashed"]) == (6, 6, 0)

    # Same size, same mtime, other content: the ctime (which no one can set back) gives it away.
    image = os.path.join(os.path.dirname(catalog), "images", "good002.jpg")
    same_size_edit(image, 99)
    c = _run(catalog, out, bundle, "d3")["counts"]
    assert (c["changed"], c["unchanged"], c["stamp_hits"], c["hashed"]) == (1, 5, 5, 1)
    assert features(out, "d3")["item002"]["content_sha256"] != features(out, "d2")["item002"]["content_sha256"]

    # A touched file whose bytes did not change is hashed once, stays unchanged and gets its new stamp.
    os.utime(image)
    c = _run(catalog, out, bundle, "d4")["counts"]
    assert (c["changed"], c["unchanged"], c["hashed"]) == (0, 6, 1)
    assert features(out, "d4")["item002"]["source_stamp"] == rio.source_stamp(image)

    c = _run(catalog, out, bundle, "d5", "--rehash")["counts"]
    assert (c["unchanged"], c["stamp_hits"], c["hashed"]) == (6, 0, 6)


def test_a_generation_of_schema_1_0_is_carried_and_gets_stamps(tmp_path, tiny_bundle, monkeypatch):
    """Feature files written before ``source_stamp`` existed: hashed once, carried, stamped from then on."""
    monkeypatch.setattr(rio, "RACY_NS", 0)
    catalog, _ = write_catalog(str(tmp_path / "c"), 5, broken=False, duplicate=False)
    out, bundle = str(tmp_path / "out"), tiny_bundle[0]
    _run(catalog, out, bundle, "d1")
    for path in glob.glob(f"{out}/features/run=d1/*.parquet"):
        old = pq.read_table(path).drop_columns(["source_stamp"])
        old = old.replace_schema_metadata({**old.schema.metadata, b"schema_version": b"1.0.0"})
        pq.write_table(old, path)
    c = _run(catalog, out, bundle, "d2")["counts"]
    assert (c["unchanged"], c["hashed"], c["stamp_hits"]) == (5, 5, 0)
    assert all(r["source_stamp"] for r in features(out, "d2").values())
    c = _run(catalog, out, bundle, "d3")["counts"]
    assert (c["unchanged"], c["hashed"], c["stamp_hits"]) == (5, 0, 5)


def test_a_second_run_on_a_locked_output_stops(tmp_path, tiny_bundle):
    catalog, _ = write_catalog(str(tmp_path / "c"), 4, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    _run(catalog, out, tiny_bundle[0], "first")
    lock = os.path.join(out, LOCK_FILE)
    with open(lock, "w") as f:  # a live run: this very process
        json.dump({"run_id": "other", "host": os.uname().nodename, "pid": os.getpid()}, f)
    with pytest.raises(LockedError, match="held by run other"):
        _run(catalog, out, tiny_bundle[0], "second")
    assert main([f"--catalog={catalog}", f"--output={out}", f"--bundle={tiny_bundle[0]}"]) == EXIT_LOCKED
    assert read_current(out) == "first"
    # A lock left by a process that is gone is stale and taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock, "w") as f:
        json.dump({"run_id": "crashed", "host": os.uname().nodename, "pid": dead.pid}, f)
    _run(catalog, out, tiny_bundle[0], "third")
    assert read_current(out) == "third" and not os.path.exists(lock)


def test_old_generations_are_pruned(tmp_path, tiny_bundle):
    catalog, _ = write_catalog(str(tmp_path / "c"), 4, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "indices", "crashed-run", "vectors"))  # leftovers of a killed run
    for day in ("d1", "d2", "d3", "d4"):
        _run(catalog, out, tiny_bundle[0], day, "--keep_generations=2")
    assert sorted(os.listdir(os.path.join(out, "indices"))) == ["d3", "d4"]
    assert sorted(os.listdir(os.path.join(out, "features"))) == ["run=d3", "run=d4"]
    assert sorted(os.listdir(os.path.join(out, "dead_letter"))) == ["run=d3", "run=d4"]
    assert Searcher.open(out, "d3").ntotal == Searcher.open(out).ntotal == 4


def test_error_rate_gate_writes_but_does_not_publish(tmp_path, tiny_bundle):
    catalog, expect = write_catalog(str(tmp_path / "c"), 3, duplicate=False)  # 3 good, 5 bad
    out = str(tmp_path / "out")
    args = [f"--catalog={catalog}", f"--output={out}", f"--bundle={tiny_bundle[0]}", f"--runner={LOCAL_RUNNER}"]
    assert main([*args, "--run_id=strict", "--max_error_rate=0.5"]) == EXIT_ERROR_RATE
    assert not os.path.exists(os.path.join(out, "CURRENT"))
    assert os.path.exists(os.path.join(out, "indices", "strict", "manifest.json"))  # inspectable
    report = json.load(open(os.path.join(out, "runs", "strict.json")))
    assert report["status"] == "rejected" and report["error_rate"] == pytest.approx(5 / 8)
    assert main([*args, "--run_id=lenient", "--max_error_rate=0.7"]) == 0
    assert read_current(out) == "lenient"


def test_bad_flags_exit_2(tmp_path, tiny_bundle):
    out = str(tmp_path / "out")
    assert main([f"--catalog={tmp_path}/nope.csv", f"--output={out}", f"--bundle={tiny_bundle[0]}"]) == EXIT_USAGE
    assert main([f"--catalog={tmp_path}/c.txt", f"--output={out}", f"--bundle={tiny_bundle[0]}"]) == EXIT_USAGE


def test_two_runs_started_at_once(tmp_path, tiny_bundle):
    """Real processes racing for one output: one publishes, the other stops with exit 3 and a clear message."""
    catalog, expect = write_catalog(str(tmp_path / "c"), 12, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    procs = []
    for name in ("a", "b"):
        argv = [
            f"--catalog={catalog}",
            f"--output={out}",
            f"--bundle={tiny_bundle[0]}",
            f"--runner={LOCAL_RUNNER}",
            f"--run_id={name}",
        ]
        code = f"import sys; from pipelines.index_catalog import main; sys.exit(main({argv!r}))"
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, EXIT_LOCKED], results
    loser = next(err for code, err in results if code == EXIT_LOCKED)
    assert "another run is writing to" in loser
    winner = read_current(out)
    assert winner in ("a", "b") and Searcher.open(out).ntotal == len(expect["good"])
    assert not os.path.exists(os.path.join(out, LOCK_FILE))
    assert not os.path.exists(os.path.join(out, "indices", "b" if winner == "a" else "a"))


def test_corrupt_bundle_exits_2_before_any_work(tmp_path, tiny_bundle, capsys):
    import shutil

    bundle = str(tmp_path / "bundle")
    shutil.copytree(tiny_bundle[0], bundle)
    weights = os.path.join(bundle, "weights.pt")
    data = bytearray(open(weights, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    catalog, _ = write_catalog(str(tmp_path / "c"), 2, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    assert main([f"--catalog={catalog}", f"--output={out}", f"--bundle={bundle}"]) == EXIT_USAGE
    assert "do not match model_id" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_help_lists_the_pipeline_flags(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--catalog", "--output", "--bundle", "--full", "--max_error_rate"))


def dead_letters(out: str, run_id: str) -> list[tuple]:
    table = pq.read_table(glob.glob(f"{out}/dead_letter/run={run_id}/*.parquet"))
    return sorted((r["item_id"], r["image_uri"], r["stage"], r["error_type"]) for r in table.to_pylist())


def test_incremental_run_treats_bad_input_as_a_full_run_does(tmp_path, tiny_bundle):
    """Duplicates, unreadable and undecodable images: an incremental run (which drops duplicates in its join
    and hashes after it) gives the same dead letters, the same features and the same index as ``--full``."""
    bundle = tiny_bundle[0]
    catalog, expect = write_catalog(str(tmp_path / "c"), 6)  # broken images, a duplicate id and an empty id
    out = str(tmp_path / "out")
    _run(catalog, out, bundle, "day1")
    second = _run(catalog, out, bundle, "day2")
    assert second["mode"] == "incremental"
    c = second["counts"]
    assert c["unchanged"] == len(expect["good"]) and c["removed"] == 0
    assert second["counters"]["read_catalog.duplicate_item_ids"] == 1
    full = _run(catalog, str(tmp_path / "full"), bundle, "ref", "--full")
    assert dead_letters(out, "day2") == dead_letters(str(tmp_path / "full"), "ref")
    assert {d[2] for d in dead_letters(out, "day2")} >= {"read_catalog", "read", "decode"}
    assert sorted(features(out, "day2")) == sorted(features(str(tmp_path / "full"), "ref")) == sorted(expect["good"])
    assert c["dead_letter"] == full["counts"]["dead_letter"]


def test_carry_rows_updates_catalog_columns_and_keeps_features(tmp_path):
    from schemas import feature_schema

    schema = feature_schema(4, 8)
    rows = feature_rows(5, 4, 8)
    table = pa.Table.from_pylist(rows, schema=schema)
    carried = [("i3", "new/3.jpg", [("price", "9")], "file:1:2:3:4"), ("i1", "new/1.jpg", [], None)]
    # A file of schema 1.0.0 (no source_stamp column) carries the same way.
    for source in (table, table.drop_columns(["source_stamp"])):
        out = incremental.carry_rows(source, carried, "day2", schema)
        assert out.schema == schema and out.schema.metadata == schema.metadata
        got = out.to_pylist()
        assert [r["item_id"] for r in got] == ["i1", "i3"]  # item-id order
        assert [r["image_uri"] for r in got] == ["new/1.jpg", "new/3.jpg"]
        assert [r["catalog"] for r in got] == [[], [("price", "9")]]
        assert [r["source_stamp"] for r in got] == [None, "file:1:2:3:4"]
        assert {r["run_id"] for r in got} == {"day2"}
        for r in got:
            k = int(r["item_id"][1:])
            for column in ("embedding", "hash_code", "content_sha256", "attributes", "indexed_at", "model_id"):
                assert r[column] == rows[k][column]  # features and the time they were embedded stay
    with pytest.raises(ValueError, match="not in their source file"):
        incremental.carry_rows(table, [("nope", "x", [], None)], "day2", schema)
