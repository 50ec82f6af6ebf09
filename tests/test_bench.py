"""The benchmarks run end to end at a tiny size (a smoke test: no timing is asserted, only that the numbers
are produced, checked against their baselines, and rendered)."""

from __future__ import annotations

import json

from bench import hamming, report


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
