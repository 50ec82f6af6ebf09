"""The benchmarks run end to end at a tiny size (a smoke test: no timing is asserted, only that the numbers
are produced, checked against their baselines, and rendered)."""

from __future__ import annotations

import json

import pytest

from bench import hamming, incremental, index_build, report
from bench.common import write_rows


def test_hamming_bench_and_report(tmp_path):
    results = tmp_path / "results"
    out = results / "hamming.json"
    assert hamming.main(["--codes", "20000", "--queries", "50", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["BFlat", "BHash3x21"]
    # The bench exits non-zero on any disagreement; the rows record that it checked.
    assert all(r["radius2_identical_to_flat"] and r["knn10_identical_to_flat"] for r in rows)
    assert rows[0]["codes"] == 20000 and rows[0]["queries"] == 100
    page = tmp_path / "docs" / "benchmarks.md"
    assert report.main(["--results", str(results), "--out", str(page)]) == 0
    text = page.read_text()
    assert "| `BHash3x21` |" in text and "(no `incremental.json` yet)" in text
    assert (tmp_path / "docs" / "img" / "hamming.png").stat().st_size > 1000


def test_incremental_bench(tmp_path, tiny_bundle):
    """Day one full, day two with 10% changed, as scheduled and with --rehash: the counts say what changed."""
    out = tmp_path / "incremental.json"
    argv = ["--artifacts", str(tmp_path), "--bundle", tiny_bundle[0], "--images", "48", "--fraction", "0.1"]
    assert incremental.main([*argv, "--out", str(out)]) == 0
    full, scheduled, rehash = json.loads(out.read_text())
    assert [r["method"] for r in (full, scheduled, rehash)] == ["full", "incremental", "incremental-rehash"]
    assert full["decoded"] == full["images"] == 48
    for row in (scheduled, rehash):
        assert (row["new"], row["changed"], row["removed"]) == (2, 2, 1)
        assert row["decoded"] == row["new"] + row["changed"] and row["ratio"] > 0
    # Every image is either trusted by its stamp or read and hashed; --rehash trusts none. (How many stamps are
    # trusted depends on timing: a stamp taken less than 2 s after the file was written is not, the racy case.)
    assert 0 <= scheduled["stamp_hits"] <= scheduled["unchanged"] and rehash["stamp_hits"] == 0
    assert scheduled["hashed"] + scheduled["stamp_hits"] == rehash["hashed"]


def test_index_build_bench_and_report(tmp_path):
    """BuildIndex vs plain faiss at a tiny size: the budget picks IVF-PQ with SQ8 re-ranking for both, the
    generation publishes, recall is measured against exact search, and the load rows come back."""
    results = tmp_path / "results"
    argv = ["--n", "10000", "--dim", "16", "--queries", "40", "--shards", "2", "--train_sample", "10000"]
    argv += ["--max_index_memory", "360K", "--verify", "1", "--work", str(tmp_path / "work")]
    argv += ["--out", str(results / "index_build.json"), "--serving_out", str(results / "serving.json")]
    assert index_build.main(argv) == 0
    plain, beam = json.loads((results / "index_build.json").read_text())
    assert plain["factory"] == beam["factory"] == "IVF512,PQ4,Refine(SQ8)"
    assert beam["vectors"] == 10000 and beam["shards"] == 2 and beam["build_time_ratio"] > 0
    assert beam["estimated_bytes"] <= 360 * 1024
    for row in (plain, beam):  # the stage times: each measured, and together within the wall time
        stages = [row["read_s"], row["train_s"], row["fill_s"]]
        assert all(t > 0 for t in stages) and sum(stages) <= row["build_s"]
    for row in (plain, beam):
        recalls = [c["recall_at_10"] for c in row["curve"]]
        assert [c["nprobe"] for c in row["curve"]] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
        assert all(0 <= r <= 1 for r in recalls) and recalls[-1] >= 0.8  # half the lists: mostly PQ error
    serving = json.loads((results / "serving.json").read_text())
    assert [(r["method"], r["verify"]) for r in serving] == [("mmap", True), ("read", True)]
    assert all(r["first_query_s"] > 0 and r["factory"] == beam["factory"] for r in serving)
    (results / "serving.json").unlink()
    assert index_build.main([*argv, "--serving_only", "--verify", "0"]) == 0  # the generation the run left
    assert [r["verify"] for r in json.loads((results / "serving.json").read_text())] == [False, False]
    page = tmp_path / "benchmarks.md"
    assert report.main(["--results", str(results), "--out", str(page)]) == 0
    assert "IVF512,PQ4,Refine(SQ8)" in page.read_text() and (tmp_path / "img" / "index_build.png").exists()


def test_write_rows_replaces_the_file_whole_or_not_at_all(tmp_path):
    out = tmp_path / "results" / "x.json"
    rows = [{"method": "a", "dataset": "d", "value": 0.5}]
    assert write_rows("x", rows, out=str(out)) == str(out)
    assert json.loads(out.read_text()) == rows and out.read_text().endswith("\n")
    with pytest.raises(TypeError):  # not JSON: the old rows stay, and no temporary file is left behind
        write_rows("x", [{"method": object()}], out=str(out))
    assert json.loads(out.read_text()) == rows
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.json"]
