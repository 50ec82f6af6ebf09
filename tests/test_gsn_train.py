"""The GSN training job: bundles, exact resume, equal grids for every loss, the transform search's split, the
clothing-small protocol's separation of train and validation photos, the pipeline, and the retrieval metrics."""

from __future__ import annotations

import csv
import dataclasses
import glob

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import retrieval_core.data.product_retrieval as pr
from retrieval_core.bundle import load_bundle
from retrieval_core.data.grid import split_by_product
from retrieval_core.embedding_transform import serve_embeddings
from retrieval_core.encoder import Encoder
from retrieval_core.eval.retrieval import category_retrieval_metrics, product_retrieval_metrics
from retrieval_core.losses.gsn import GridTripletLoss
from retrieval_core.preprocess import Preprocessing, decode_image, resize_for_model
from retrieval_core.rl.controller import SearchResult
from retrieval_core.train import gsn
from tests.conftest import pipeline_flags

SIZE = 16


def _product_image(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A blocky random pattern: different products are clearly different images."""
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((size // 4, size // 4, 1), np.uint8))


def _view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A "consumer view": shifted by a pixel, with noise."""
    shifted = np.roll(image, rng.integers(-1, 2, 2), axis=(0, 1)).astype(np.int16)
    return np.clip(shifted + rng.integers(-25, 26, image.shape), 0, 255).astype(np.uint8)


def tiny_data(n_products: int = 12, views: int = 2, seed: int = 0) -> pr.ProductRetrievalData:
    """A synthetic-protocol dataset in memory: 12 training and 12 evaluated products, 3 categories, 2 views each."""
    rng = np.random.default_rng(seed)

    def catalog(first: int):
        products = np.arange(first, first + n_products, dtype=np.int64)
        shop = np.stack([_product_image(rng) for _ in products])
        q_products = np.repeat(products, views)
        queries = np.stack([_view(shop[p - first], rng) for p in q_products])
        return shop, products, products % 3, queries, q_products, q_products % 3

    tg, tg_p, tg_c, tq, tq_p, tq_c = catalog(0)
    eg, eg_p, eg_c, eq, eq_p, eq_c = catalog(n_products)
    return pr.ProductRetrievalData(
        dataset="synthetic",
        protocol="tiny",
        prep=Preprocessing(image_size=SIZE),
        classes=("a", "b", "c"),
        train_gallery=tg,
        train_gallery_products=tg_p,
        train_gallery_categories=tg_c,
        train_query_products=tq_p,
        train_query_categories=tq_c,
        train_queries=tq,
        train_query_source=None,
        train_query_ids=tuple(f"t{i}" for i in range(len(tq_p))),
        eval_queries=eq,
        eval_query_products=eq_p,
        eval_query_categories=eq_c,
        eval_query_ids=tuple(f"e{i}" for i in range(len(eq_p))),
        eval_gallery=eg,
        eval_gallery_products=eg_p,
        eval_gallery_categories=eg_c,
        eval_gallery_ids=tuple(f"g{i}" for i in range(len(eg_p))),
    )


def tiny_config(tmp_path, name: str, **overrides) -> gsn.GSNConfig:
    settings = {
        "dataset": "synthetic",
        "image_size": SIZE,
        "embedding_dim": 16,
        "hash_bits": 16,
        "widths": (4, 8, 8, 8),
        "epochs": 2,
        "grids_per_batch": 4,
        "lr": 1e-2,
        "cache_dir": "",
    }
    return gsn.GSNConfig(out=str(tmp_path / name), threads=1, **{**settings, **overrides})


@pytest.fixture(scope="module")
def data():
    return tiny_data()


def test_writes_a_bundle_and_resumes_exactly(tmp_path, monkeypatch, data):
    straight = gsn.main(tiny_config(tmp_path, "straight", epochs=3), data)
    config, _ = load_bundle(str(tmp_path / "straight"))
    assert config.model_id == straight.bundle.model_id and config.model_name == "baseline_cnn"
    assert config.training["method"] == "gsn" and config.categories == data.classes and not config.embedding_transform
    assert {"recall_at_1", "recall_at_10", "map_all", "top1_acc"} <= set(config.metrics)
    assert "recall_at_20" not in config.metrics  # the tiny gallery has 12 items: larger cut-offs are left out
    assert len(config.training["history"]) == 3 and {"loss_grid", "loss_hash", "loss_category", "loss_grid_acc"} <= set(
        config.training["history"][0]
    )

    real_epoch = gsn.train_one_epoch

    def crash_at_third_epoch(trainer, data, sampler, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(trainer, data, sampler, epoch)

    cfg = tiny_config(tmp_path, "resumed", epochs=3)
    monkeypatch.setattr(gsn, "train_one_epoch", crash_at_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        gsn.main(cfg, data)
    monkeypatch.setattr(gsn, "train_one_epoch", real_epoch)
    resumed = gsn.main(dataclasses.replace(cfg, resume=True), data)
    assert resumed.bundle.model_id == straight.bundle.model_id  # identical weights


def test_resume_refuses_another_configuration_but_not_another_search(tmp_path, data):
    gsn.main(tiny_config(tmp_path, "run", epochs=1), data)
    with pytest.raises(ValueError, match="epochs: 1 -> 2"):
        gsn.main(tiny_config(tmp_path, "run", epochs=2, resume=True), data)
    with pytest.raises(ValueError, match="loss: 'gsn' -> 'triplet'"):
        gsn.main(tiny_config(tmp_path, "run", epochs=1, loss="triplet", resume=True), data)
    # Search settings do not change the weights: the finished checkpoint goes straight to the search.
    run = gsn.main(tiny_config(tmp_path, "run", epochs=1, transform_steps=1, transform_batch=2, resume=True), data)
    assert run.transform is not None and run.train_s == pytest.approx(run.bundle.training["train_s"], abs=0.1)


def test_every_loss_sees_the_same_grids_and_batches(tmp_path, data, monkeypatch):
    seen: dict[str, list] = {loss: [] for loss in gsn.LOSSES}
    real_step = gsn.training_step

    def record(trainer, step, gen):
        seen[trainer.cfg.loss].append((step, gen.get_state().clone()))
        return real_step(trainer, step, gen)

    monkeypatch.setattr(gsn, "training_step", record)
    for loss in gsn.LOSSES:
        gsn.main(tiny_config(tmp_path, loss, loss=loss), data)
    assert len(seen["gsn"]) == 2 * 6  # 24 queries, 4 grids a step, 2 epochs
    for loss in ("gsn-softmax", "triplet"):
        assert len(seen[loss]) == len(seen["gsn"])
        for (a, gen_a), (b, gen_b) in zip(seen["gsn"], seen[loss]):
            for name in ("queries", "cells", "positive_pos", "query_categories", "cell_categories"):
                assert np.array_equal(getattr(a, name), getattr(b, name))
            assert torch.equal(gen_a, gen_b)  # and the same augmentation
    step = seen["gsn"][0][0]
    assert step.cells.shape == (4, 9, SIZE, SIZE, 3) and step.queries.shape == (4, SIZE, SIZE, 3)


def test_grid_triplet_loss_matches_a_naive_loop():
    scores = torch.rand(5, 9) * 2 - 1
    pos = torch.tensor([0, 3, 8, 4, 4])
    expected = np.mean(
        [
            max(0.0, 0.2 - float(scores[i, pos[i]]) + float(scores[i, j]))
            for i in range(5)
            for j in range(9)
            if j != pos[i]
        ]
    )
    assert float(GridTripletLoss(0.2)(scores, pos)) == pytest.approx(expected, rel=1e-6)


def test_transform_search_never_sees_the_report_half(tmp_path, monkeypatch):
    data = tiny_data(n_products=13)  # 13 held-out products: select, confirm and report parts of unequal sizes
    captured, scored = {}, []
    real_search, real_score = gsn.search, gsn.TransformReward.score

    def spy_search(grammar, reward_fn, **kwargs):
        captured["reward"] = reward_fn
        return real_search(grammar, reward_fn, **kwargs)

    def spy_score(self, transform):
        scored.append(np.array(self.query_index))
        return real_score(self, transform)

    monkeypatch.setattr(gsn, "search", spy_search)
    monkeypatch.setattr(gsn.TransformReward, "score", spy_score)
    cfg = tiny_config(tmp_path, "t", transform_steps=3, transform_batch=4, split_seed=5)
    run = gsn.main(cfg, data)

    products = data.eval_query_products
    search_idx, report_idx = split_by_product(products, 0.5, 5)
    select_part, confirm_part = split_by_product(products[search_idx], 0.5, 6)
    select_idx, confirm_idx = search_idx[select_part], search_idx[confirm_part]
    assert [len(select_idx), len(confirm_idx), len(report_idx)] == [6, 8, 12]
    assert all(
        np.array_equal(a, b) for a, b in zip(gsn.transform_split(products, 5), (select_idx, confirm_idx, report_idx))
    )
    # Every query of a product is in one part.
    parts = [set(products[i]) for i in (select_idx, confirm_idx, report_idx)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])

    # The controller's reward holds exactly the select queries' embeddings and the gallery's, nothing else.
    config, model = load_bundle(cfg.out)
    queries = gsn.embed(model, config.preprocessing, data.eval_queries).raw
    gallery = gsn.embed(model, config.preprocessing, data.eval_gallery).raw
    reward = captured["reward"]
    assert np.array_equal(reward.query_index, select_idx)
    np.testing.assert_allclose(reward.query_raw, queries[select_idx], atol=1e-6)
    np.testing.assert_array_equal(reward.query_products, products[select_idx])
    np.testing.assert_allclose(reward.gallery_raw, gallery, atol=1e-6)
    # Every score of the search (the identity's, the controller's, the confirmation) is on select or confirm.
    assert scored and all(np.array_equal(i, select_idx) or np.array_equal(i, confirm_idx) for i in scored)
    assert any(np.array_equal(i, confirm_idx) for i in scored) and not set(np.concatenate(scored)) & set(report_idx)

    summary = run.transform
    assert (summary["select_queries"], summary["confirm_queries"], summary["report_queries"]) == (6, 8, 12)
    assert summary["identity_select_reward"] == round(reward.score(None), 4)
    gain = summary["min_gain"]
    assert gain == 0.005 and summary["adopted"] == (
        bool(summary["best_expression"])
        and summary["best_select_reward"] > summary["identity_select_reward"] + gain
        and summary["best_confirm_reward"] > summary["identity_confirm_reward"] + gain
    )
    assert run.bundle.embedding_transform == (summary["best_expression"] if summary["adopted"] else "")
    assert set(summary["report"]) <= {"untransformed", "transformed"} and "report_map_all" in run.metrics
    # The report half's untransformed numbers are those of the report queries' served features.
    expected = gsn.product_metrics(data, serve_embeddings(queries[report_idx]), serve_embeddings(gallery), report_idx)
    assert run.metrics["report_map_all"] == pytest.approx(expected["map_all"], abs=1e-4)


def _fake_evaluation(data: pr.ProductRetrievalData, seed: int = 0) -> gsn.Evaluation:
    """Model embeddings without a model: each query near its product's gallery row, with enough noise to miss."""
    rng = np.random.default_rng(seed)
    gallery = rng.normal(size=(len(data.eval_gallery_products), 16)).astype(np.float32)
    position = np.searchsorted(data.eval_gallery_products, data.eval_query_products)
    queries = (gallery[position] + 0.9 * rng.normal(size=(len(position), 16))).astype(np.float32)

    def embedded(raw):
        return gsn.Embedded(raw=raw, codes=np.zeros((len(raw), 2), np.uint8), category=np.zeros(len(raw), np.int64))

    return gsn.Evaluation({}, embedded(queries), embedded(gallery))


def _fake_search(rewards: dict[str, float]):
    def fake(grammar, reward_fn, **kwargs):
        return SearchResult(
            max(rewards, key=rewards.get), max(rewards.values()), (), len(rewards), len(rewards), dict(rewards), 0
        )

    return fake


def test_the_identity_in_disguise_is_never_adopted(monkeypatch):
    data = tiny_data()
    ev = _fake_evaluation(data)
    # The controller "found" identity-equivalent spellings on top (rounding noise can score them above the
    # identity), a constant that cannot be stored, then a real transform.
    rewards = {"add(x, x)": 0.99, "neg(x)": 0.985, "max(x, x)": 0.98, "sign(exp(x))": 0.975, "mul(tanh(x), x)": 0.5}
    monkeypatch.setattr(gsn, "search", _fake_search(rewards))
    cfg = gsn.GSNConfig(transform_steps=1, transform_min_gain=-2.0)
    transform, summary, scalars = gsn.search_transform(cfg, data, ev)
    assert summary["best_expression"] == transform == "mul(tanh(x), x)" and summary["adopted"]
    assert summary["identity_equivalents_passed_over"] == ["add(x, x)", "neg(x)", "max(x, x)"]
    assert summary["best_select_reward"] == 0.5  # the controller's number for it
    assert {k[len("served_") :]: v for k, v in scalars.items() if k.startswith("served_")} == summary["report"][
        "transformed"
    ]

    select_idx, confirm_idx, _ = gsn.transform_split(data.eval_query_products, cfg.split_seed)
    confirm = gsn.TransformReward(
        ev.queries.raw[confirm_idx],
        data.eval_query_products[confirm_idx],
        ev.gallery.raw,
        data.eval_gallery_products,
        "map",
        confirm_idx,
    )
    assert summary["best_confirm_reward"] == round(confirm.score("mul(tanh(x), x)"), 4)
    assert summary["identity_confirm_reward"] == round(confirm.score(None), 4)
    assert confirm.same_as_identity("add(x, x)") and confirm.same_as_identity("mul(x, 2)")
    assert not confirm.same_as_identity("mul(tanh(x), x)")

    # Nothing but the identity in disguise: nothing to adopt.
    monkeypatch.setattr(gsn, "search", _fake_search({"add(x, x)": 0.99, "mul(x, 2)": 0.9}))
    transform, summary, scalars = gsn.search_transform(cfg, data, ev)
    assert transform == "" and summary["best_expression"] == "" and not summary["adopted"]
    assert scalars["served_map_all"] == scalars["report_map_all"]


def test_adoption_needs_the_confirm_queries_to_agree(monkeypatch):
    data = tiny_data()
    ev = _fake_evaluation(data)
    # A select score far above the identity's, as the maximum over many noisy scores can be: on its own not
    # enough; the confirm queries decide.
    monkeypatch.setattr(gsn, "search", _fake_search({"mul(tanh(x), x)": 1.0}))
    for gain in (-2.0, 0.005, 0.9):
        cfg = gsn.GSNConfig(transform_steps=1, transform_min_gain=gain)
        transform, summary, scalars = gsn.search_transform(cfg, data, ev)
        confirm_gain = summary["best_confirm_reward"] - summary["identity_confirm_reward"]
        assert summary["adopted"] == (confirm_gain > gain) and (transform != "") == summary["adopted"]
        served = summary["report"]["transformed" if summary["adopted"] else "untransformed"]
        assert {k: scalars[f"served_{k}"] for k in served} == served
    assert summary["adopted"] is False  # a gain of 0.9 mAP is never confirmed here


def test_the_reward_scores_exactly_the_served_features():
    data = tiny_data()
    ev = _fake_evaluation(data)
    rows = np.arange(10)
    reward = gsn.TransformReward(
        ev.queries.raw[rows], data.eval_query_products[rows], ev.gallery.raw, data.eval_gallery_products, "map", rows
    )
    for transform in (None, "mul(tanh(x), x)", "mul(cube(mul(cube(x), cube(x))), cube(mul(cube(x), cube(x))))"):
        q, g = serve_embeddings(ev.queries.raw[rows], transform), serve_embeddings(ev.gallery.raw, transform)
        # The served rows, ranked by inner product as the index ranks them, without repairing them.
        scores = q.astype(np.float64) @ g.T.astype(np.float64)
        target = np.searchsorted(data.eval_gallery_products, data.eval_query_products[rows])
        rank = np.array([1 + np.sum(s > s[t]) + np.sum((s == s[t])[:t]) for s, t in zip(scores, target)])
        assert reward.score(transform) == pytest.approx(float(np.mean(1.0 / rank)), abs=1e-12)


def _write_catalog(root, pixels: np.ndarray) -> tuple[str, list[str]]:
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(images / f"x{i:02d}.png")
        rows.append({"item_id": f"x{i:02d}", "image_uri": f"images/x{i:02d}.png"})
    catalog = str(root / "catalog.csv")
    with open(catalog, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["item_id", "image_uri"])
        w.writeheader()
        w.writerows(rows)
    return catalog, [r["item_id"] for r in rows]


def test_the_pipeline_indexes_a_gsn_bundle_with_its_transform(tmp_path, data):
    from pipelines.index_catalog import run as run_pipeline

    # A minimum gain below -1 adopts the best storable expression whatever it scores: a transform to index.
    cfg = tiny_config(tmp_path, "gsn", transform_steps=3, transform_batch=8, transform_min_gain=-2.0)
    result = gsn.main(cfg, data)
    transform = result.bundle.embedding_transform
    assert transform and transform == result.transform["best_expression"] and result.bundle.format_version == 2
    assert "report_transformed_map_all" in result.metrics

    catalog, ids = _write_catalog(tmp_path / "catalog", data.eval_gallery[:8])
    out = str(tmp_path / "out")
    report = run_pipeline(pipeline_flags(catalog, out, cfg.out, "--num_shards=1", "--batch_size=4", "--run_id=r1"))
    assert report["status"] == "published" and report["counts"]["indexed"] == 8
    rows = {r["item_id"]: r for r in pq.read_table(glob.glob(f"{out}/features/run=r1/*.parquet")).to_pylist()}
    encoder = Encoder.from_bundle(cfg.out)
    config, model = load_bundle(cfg.out)
    for i, item in enumerate(ids):
        pixels = decode_image((tmp_path / "catalog" / "images" / f"{item}.png").read_bytes(), config.preprocessing)
        assert np.array_equal(pixels.pixels, data.eval_gallery[i])
        stored = np.asarray(rows[item]["embedding"], np.float32)
        np.testing.assert_allclose(stored, encoder.encode([pixels.pixels]).embeddings[0], atol=1e-6)
        # ... which is what the job scored the transform on.
        raw = gsn.embed(model, config.preprocessing, data.eval_gallery[i : i + 1]).raw
        np.testing.assert_allclose(stored, serve_embeddings(raw, transform)[0], atol=1e-6)
        assert rows[item]["category"] in data.classes


def test_untransformed_features_are_the_encoder_s(tmp_path, data):
    gsn.main(tiny_config(tmp_path, "plain", epochs=1), data)
    config, model = load_bundle(str(tmp_path / "plain"))
    encoded = Encoder.from_bundle(str(tmp_path / "plain")).encode(data.eval_queries)
    embedded = gsn.embed(model, config.preprocessing, data.eval_queries, batch_size=5)
    np.testing.assert_array_equal(serve_embeddings(embedded.raw), encoded.embeddings)
    assert np.array_equal(embedded.codes, encoded.codes)


# ------------------------------------------------------------------------------- clothing-small on disk


CLASSES = ("dress", "hat", "t-shirt")  # clothing-small folder names, all in the consumer-to-shop table
SHOP_TYPES = {"Dresses": "dress", "Caps": "hat", "Tshirts": "t-shirt", "Watches": None}


def _write_photo_folders(root, seed: int = 0) -> dict[str, list[str]]:
    """clothing-small/{train,validation}/<class>/<id>.jpg and fashion-product-small/{styles.csv,images/}."""
    rng = np.random.default_rng(seed)
    ids: dict[str, list[str]] = {"train": [], "validation": []}
    for split, n in (("train", 5), ("validation", 2)):
        for c in CLASSES:
            folder = root / "clothing-small" / split / c
            folder.mkdir(parents=True)
            for k in range(n):
                item = f"{split[0]}{c}{k}"
                # 40 tall, 32 wide: letterboxed with white bars at the model's input, as portrait photos are.
                Image.fromarray(_product_image(rng, 40)[:, 4:36]).save(folder / f"{item}.jpg", quality=95)
                ids[split].append(item)
    shop = root / "fashion-product-small"
    (shop / "images").mkdir(parents=True)
    with open(shop / "styles.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "gender", "articleType"])
        for i, article in enumerate([t for t in SHOP_TYPES for _ in range(3)]):
            w.writerow([1000 + i, "Men", article])
            Image.fromarray(_product_image(rng, 40)).save(shop / "images" / f"{1000 + i}.jpg", quality=95)
    return ids


def test_clothing_small_keeps_validation_photos_out_of_training(tmp_path, monkeypatch):
    ids = _write_photo_folders(tmp_path)
    keys: list[tuple[str, int]] = []
    real_distort = pr.distort

    shapes = set()

    def spy(pixels, key, seed=0, *args, **kwargs):
        keys.append((key, seed))
        shapes.add(pixels.shape)
        return real_distort(pixels, key, seed, *args, **kwargs)

    monkeypatch.setattr(pr, "distort", spy)
    cfg = tiny_config(
        tmp_path,
        "cs",
        dataset="clothing-small",
        data_dir=str(tmp_path),
        cache_dir=str(tmp_path / "cache"),
        image_size=32,
        epochs=2,
        grids_per_batch=3,
        seed=3,
    )
    data = gsn.load_data(cfg)
    # Evaluation: one view of each validation photo, with keys of their own and the fixed seed, made at the
    # working resolution (long side 256, the photo's own 40:32 aspect), not at the model's 32 px.
    assert sorted(keys) == sorted((f"eval:{i}", pr.EVAL_DISTORTION_SEED) for i in ids["validation"])
    assert shapes == {(256, 205, 3)}
    assert sorted(data.eval_query_ids) == sorted(ids["validation"])
    assert sorted(data.eval_gallery_ids) == sorted(ids["train"] + ids["validation"])  # every photo, once
    assert sorted(data.train_query_ids) == sorted(ids["train"]) and len(data.train_gallery) == len(ids["train"])
    # Each query's hit is its own original photo in the gallery.
    for q, item in enumerate(data.eval_query_ids):
        (hit,) = np.flatnonzero(data.eval_gallery_products == data.eval_query_products[q])
        assert data.eval_gallery_ids[hit] == item

    keys.clear()
    cells_seen = []
    real_step = gsn.training_step

    def record(trainer, step, gen):
        cells_seen.append(step.cells.reshape(-1, *step.cells.shape[2:]))
        return real_step(trainer, step, gen)

    monkeypatch.setattr(gsn, "training_step", record)
    run = gsn.main(cfg, data)
    # Training: fresh views of train photos every epoch, never a validation photo or an evaluation key.
    assert len(keys) == 2 * (15 // 3) * 3 and shapes == {(256, 205, 3)}
    assert {(k.split(":")[0], s) for k, s in keys} == {("train", 3)}
    assert {k.split(":")[1] for k, _ in keys} <= set(ids["train"])
    assert {int(k.split(":")[2]) for k, _ in keys} == {0, 1}
    val_photos = {
        data.eval_gallery[i].tobytes() for i, item in enumerate(data.eval_gallery_ids) if item in ids["validation"]
    }
    train_photos = {p.tobytes() for p in data.train_gallery}
    for cells in cells_seen:
        assert all(c.tobytes() in train_photos and c.tobytes() not in val_photos for c in cells)

    shop = data.shop
    assert shop is not None and shop.left_out_classes == () and len(shop.gallery_labels) == 12
    assert sorted(shop.gallery_labels.tolist()) == [-1] * 3 + [0] * 3 + [1] * 3 + [2] * 3  # Watches: no class
    # Cut-offs beyond the tiny galleries (12 shop photos, 21 photos) are left out.
    assert "c2s_precision_at_10" in run.metrics and "c2s_map_at_100" not in run.metrics
    assert {"recall_at_1", "recall_at_20", "map_all"} <= set(run.metrics)
    assert run.bundle.training["c2s"]["left_out_classes"] == []


def test_consumer_views_do_not_depend_on_the_model_s_image_size(tmp_path, monkeypatch):
    ids = _write_photo_folders(tmp_path)
    views: dict[str, np.ndarray] = {}
    real_distort = pr.distort

    def spy(pixels, key, seed=0, *args, **kwargs):
        out = real_distort(pixels, key, seed, *args, **kwargs)
        if key in views:  # the same view whatever the image size
            np.testing.assert_array_equal(out, views[key])
        views[key] = out
        return out

    monkeypatch.setattr(pr, "distort", spy)
    cache, folder = str(tmp_path / "cache"), str(tmp_path / "clothing-small")
    for size in (32, 16):
        prep = Preprocessing(image_size=size)
        data = pr.load_clothing_small(prep, folder, cache, with_shop=False)
        for query, item in zip(data.eval_queries, data.eval_query_ids):
            # The model's preprocessing after the distortion: resize and letterbox the 256-px view.
            expected = np.asarray(resize_for_model(Image.fromarray(views[pr.eval_view_key(item)]), prep))
            np.testing.assert_array_equal(query, expected)
        # Portrait photos get white bars left and right, in the queries exactly as in the gallery: the
        # distortion never tints or moves them.
        bar = (size - round(32 * size / 40)) // 2
        assert bar >= 1 and (data.eval_gallery[:, :, :bar] == 255).all()
        assert (data.eval_queries[:, :, :bar] == 255).all() and (data.eval_queries[:, :, -bar:] == 255).all()
        train_views = data.train_query_views(np.arange(3), epoch=0, seed=1)
        assert train_views.shape == (3, size, size, 3) and (train_views[:, :, :bar] == 255).all()
    assert len(views) == len(ids["validation"]) + 3


# ---------------------------------------------------------------------------------------------- metrics


def _naive(query, q_products, gallery, g_products, q_cat, g_cat, ks, cat_k):
    """One query at a time: cosine by hand, ranked by (-score, gallery index)."""
    recall = {k: 0 for k in ks}
    ap, cat_ap = [], []
    for i in range(len(query)):
        scores = []
        for j in range(len(gallery)):
            s = sum(a * b for a, b in zip(query[i], gallery[j]))
            s /= np.sqrt(sum(a * a for a in query[i])) * np.sqrt(sum(b * b for b in gallery[j]))
            scores.append((-s, j))
        ranked = [j for _, j in sorted(scores)]
        relevant = [g_products[j] == q_products[i] for j in ranked]
        for k in ks:
            recall[k] += any(relevant[:k])
        hits, total = 0, 0.0
        for rank, rel in enumerate(relevant, 1):
            if rel:
                hits += 1
                total += hits / rank
        ap.append(total / sum(relevant) if sum(relevant) else 0.0)
        hits, total = 0, 0.0
        for rank, j in enumerate(ranked[:cat_k], 1):
            if g_cat[j] == q_cat[i]:
                hits += 1
                total += hits / rank
        cat_ap.append(total / hits if hits else 0.0)
    out = {f"recall_at_{k}": recall[k] / len(query) for k in ks}
    return {**out, "map_all": float(np.mean(ap)), f"category_map_at_{cat_k}": float(np.mean(cat_ap))}


def test_product_retrieval_metrics_match_a_naive_loop():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(30, 6))
    gallery[7] = gallery[3] * 2.0  # ties: the same direction, so equal cosines; the lower index must win
    gallery[20] = gallery[3]
    g_products = rng.integers(0, 12, 30)
    g_cat = g_products % 4
    query = np.vstack([gallery[[3, 5, 9]] + 0.05, rng.normal(size=(10, 6))])
    q_products = np.concatenate([g_products[[3, 5, 9]], rng.integers(0, 14, 10)])  # 12, 13: not in the gallery
    q_cat = q_products % 4
    got = product_retrieval_metrics(query, q_products, gallery, g_products, (1, 5, 10), q_cat, g_cat, (8,), chunk=4)
    expected = _naive(query, q_products, gallery, g_products, q_cat, g_cat, (1, 5, 10), 8)
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], abs=1e-12), k
    cat = category_retrieval_metrics(query, q_cat, gallery, g_cat, map_at=(8,), precision_at=(5,))
    assert cat["map_at_8"] == pytest.approx(expected["category_map_at_8"], abs=1e-12)
    order = [
        sorted(range(30), key=lambda j: (-float(np.dot(q, gallery[j]) / np.linalg.norm(gallery[j])), j)) for q in query
    ]
    p5 = np.mean([np.mean([g_cat[j] == q_cat[i] for j in order[i][:5]]) for i in range(len(query))])
    assert cat["precision_at_5"] == pytest.approx(p5, abs=1e-12)


def test_category_retrieval_metrics_refuse_mismatched_lengths():
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    labels_q, labels_g = np.arange(5) % 2, np.arange(7) % 2
    assert set(category_retrieval_metrics(query, labels_q, gallery, labels_g, (5,), (3,))) == {
        "map_at_5",
        "precision_at_3",
    }
    for q_labels, g_labels in ((labels_q[:4], labels_g), (labels_q, np.append(labels_g, 1)), (labels_q, labels_g[:6])):
        with pytest.raises(ValueError, match="one label per query and per gallery item"):
            category_retrieval_metrics(query, q_labels, gallery, g_labels, (5,), (3,))
    with pytest.raises(ValueError, match="empty"):
        category_retrieval_metrics(query, labels_q, gallery[:0], labels_g[:0])


def test_inner_product_ranking_does_not_repair_rows():
    """normalise=False ranks the rows as given (as an index does); the default ranks by cosine."""
    query = np.array([[1.0, 0.0]])
    gallery = np.array([[0.6, 0.8], [0.1, 0.0]])  # the second is the closer direction but has a tiny norm
    products, q_products = np.array([0, 1]), np.array([1])
    assert product_retrieval_metrics(query, q_products, gallery, products, ks=(1,))["recall_at_1"] == 1.0
    assert product_retrieval_metrics(query, q_products, gallery, products, ks=(1,), normalise=False)["recall_at_1"] == 0
    cat = category_retrieval_metrics(query, q_products, gallery, products, (1,), (1,), normalise=False)
    assert cat["precision_at_1"] == 0.0


def test_bad_settings_are_refused(tmp_path):
    for flags, message in (
        (["--loss", "contrastive"], "loss"),
        (["--dataset", "mnist"], "dataset"),
        (["--transform_metric", "ndcg"], "transform_metric"),
        (["--hash_bits", "12"], "multiple of 8"),
    ):
        with pytest.raises(SystemExit, match=message):
            gsn.cli([*flags, "--out", str(tmp_path / "x")])
