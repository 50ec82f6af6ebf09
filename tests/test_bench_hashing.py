"""``make bench-hashing`` at a tiny size: the row shape, the table in the doc, kept rows, a skipped dataset."""

from __future__ import annotations

import json

import pytest

from bench import hashing as bench
from retrieval_core.data import fashion_mnist

ROW_KEYS = {"method", "dataset", "protocol", "bits", "map_all", "precision_r2", "train_s", "encode_s", "epochs", "seed"}


def test_tiny_hashing_bench(tmp_path):
    try:
        fashion_mnist.find_dir()
    except fashion_mnist.FashionMNISTError as e:
        pytest.skip(f"real Fashion-MNIST not installed (make data): {e}")
    out, doc = tmp_path / "hashing.json", tmp_path / "results.md"
    earlier = {
        **dict.fromkeys(bench.METRICS, 0.5),
        **{"method": "adsh", "dataset": "fashion-product-small", "protocol": "p", "bits": 16, "train_s": 1.0},
        **{"encode_s": 1.0, "epochs": 1, "seed": 0, "query_size": 1, "database_size": 2, "machine": "m", "commit": "x"},
    }
    out.write_text(json.dumps([earlier]))
    doc.write_text(
        "# Results\n\nkept above\n\n<!-- bench-hashing:begin -->\nold table\n<!-- bench-hashing:end -->\nkept below\n"
    )
    empty_data_dir = tmp_path / "no-data"
    empty_data_dir.mkdir()
    argv = ["--datasets", "fashion-mnist", "clothing-small", "--bits", "16", "--epochs", "1", "--limit_train", "256"]
    argv += ["--limit_query", "64", "--data_dir", str(empty_data_dir), "--artifacts", str(tmp_path / "art")]
    assert bench.main([*argv, "--out", str(out), "--doc", str(doc)]) == 0

    curves = json.loads((tmp_path / "hashing-curves.json").read_text())
    assert {c["method"] for c in curves} == {"adsh", "dch", "itq", "lsh"}
    assert all(len(c["pr_curve"]["radius"]) == 17 and "precision_at_k_curve" in c for c in curves)
    rows = json.loads(out.read_text())
    assert rows[0] == earlier  # a dataset this run did not measure keeps its rows
    new = [r for r in rows if r["dataset"] == "fashion-mnist"]
    assert sorted(r["method"] for r in new) == ["adsh", "dch", "itq", "lsh"]
    for r in new:
        assert ROW_KEYS <= set(r) and r["bits"] == 16 and r["database_size"] == 256 and r["query_size"] == 64
        assert 0 <= r["map_all"] <= 1 and r["machine"] and r["commit"]
    text = doc.read_text()
    assert "old table" not in text and "kept above" in text and "kept below" in text
    assert "| 16 | adsh |" in text and "### fashion-mnist" in text and "### fashion-product-small" in text
    assert "clothing-small: skipped" in text  # the empty data dir has no clothing photos
    # The curves are drawn beside the doc, one PNG per dataset with curves, and linked from its section.
    png = tmp_path / "img" / "hashing-fashion-mnist.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](img/hashing-fashion-mnist.png)" in text

    # --methods re-runs one method; the other methods' rows (and curves) of the dataset are kept as they were.
    before = {r["method"]: r for r in rows if r["dataset"] == "fashion-mnist"}
    monkey_commit = "re-run"
    bench_stamp = bench.commit
    try:
        bench.commit = lambda: monkey_commit
        assert bench.main([*argv, "--methods", "adsh", "--out", str(out), "--doc", str(doc)]) == 0
    finally:
        bench.commit = bench_stamp
    after = {r["method"]: r for r in json.loads(out.read_text()) if r["dataset"] == "fashion-mnist"}
    assert sorted(after) == ["adsh", "dch", "itq", "lsh"] and after["adsh"]["commit"] == "re-run"
    assert all(after[m] == before[m] for m in ("dch", "itq", "lsh"))
    assert sorted(c["method"] for c in json.loads((tmp_path / "hashing-curves.json").read_text())) == sorted(after)
    assert "adsh: " in doc.read_text() and "; commit re-run." in doc.read_text()  # the table says which rows are new


def test_tiny_ablation_bench(tmp_path):
    from bench import hashing_ablation

    try:
        fashion_mnist.find_dir()
    except fashion_mnist.FashionMNISTError as e:
        pytest.skip(f"real Fashion-MNIST not installed (make data): {e}")
    out, doc = tmp_path / "ablation.json", tmp_path / "results.md"
    doc.write_text("# Results\n\nkept\n")
    argv = ["--quick", "--variants", "dch", "adsh-binary", "adsh-prior", "--seeds", "0", "1", "--bits", "16"]
    assert (
        hashing_ablation.main([*argv, "--artifacts", str(tmp_path / "art"), "--out", str(out), "--doc", str(doc)]) == 0
    )
    rows = json.loads(out.read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [
        (m, s) for s in (0, 1) for m in ("dch", "adsh-binary", "adsh-prior")
    ]
    assert rows[1]["overrides"] == hashing_ablation.VARIANTS["adsh-binary"] and all(
        0 <= r["map_all"] <= 1 for r in rows
    )
    assert rows[0]["database_size"] == 512 and rows[0]["machine"]
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept\n") and "| adsh-prior | adversary=prior, w_adv=0.1," in text
    assert text.count("bench-hashing-ablation:begin") == 1
    gap = rows[2]["map_all"] - rows[0]["map_all"]
    assert f"{gap:+.4f}" in text  # the per-seed gap to DCH
