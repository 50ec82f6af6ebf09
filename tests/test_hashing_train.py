"""The hashing training job: ADSH and DCH write bundles, resume exactly, learn, and the pipeline indexes them."""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import retrieval_core.train.hashing as hashing
from retrieval_core.bundle import load_bundle
from retrieval_core.data import fashion_mnist
from retrieval_core.encoder import Encoder
from retrieval_core.preprocess import decode_image
from retrieval_core.search import Searcher
from tests.conftest import pipeline_flags


def tiny_data(n_db: int = 96, n_query: int = 24, seed: int = 0) -> hashing.HashingData:
    """Three classes of 28 x 28 grey images: a bright block in a class-specific corner, on noise."""
    rng = np.random.default_rng(seed)

    def images(n):
        labels = np.arange(n) % 3
        pixels = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            r, col = [(2, 2), (2, 16), (16, 9)][c] + rng.integers(-2, 3, 2)
            pixels[i, r : r + 10, col : col + 10] = rng.integers(180, 256)
        return np.repeat(pixels[..., None], 3, axis=3), labels.astype(np.int64)

    db, db_labels = images(n_db)
    query, query_labels = images(n_query)
    return hashing.HashingData(
        dataset="fashion-mnist",
        protocol="tiny",
        prep=hashing.FASHION_MNIST_PREP,
        classes=("top-left", "top-right", "bottom"),
        db_pixels=db,
        db_labels=db_labels,
        query_pixels=query,
        query_labels=query_labels,
    )


def tiny_config(tmp_path, name: str, **overrides) -> hashing.HashingConfig:
    settings = {"bits": 16, "embedding_dim": 16, "widths": (4, 8, 8, 8), "epochs": 3, "batch_size": 16, "lr": 1e-2}
    return hashing.HashingConfig(out=str(tmp_path / name), threads=1, **{**settings, **overrides})


@pytest.fixture(scope="module")
def data():
    return tiny_data()


def test_adsh_writes_a_bundle_and_resumes_exactly(tmp_path, monkeypatch, data):
    straight = hashing.main(tiny_config(tmp_path, "straight"), data)
    config, model = load_bundle(str(tmp_path / "straight"))
    assert config.model_id == straight.bundle.model_id
    assert config.training["method"] == "adsh" and config.hash_bits == 16
    assert {"map_all", "precision_r2", "retrieved_r2", "top1_acc"} <= set(config.metrics)
    history = config.training["history"]
    assert len(history) == 3 and {"loss_adv", "loss_disc", "loss_cauchy", "loss_quant"} <= set(history[0])
    assert straight.db["codes"].shape == (96, 2) and straight.queries["embeddings"].shape == (24, 16)

    real_epoch = hashing.train_one_epoch

    def crash_at_third_epoch(trainer, data, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(trainer, data, epoch)

    cfg = tiny_config(tmp_path, "resumed")
    monkeypatch.setattr(hashing, "train_one_epoch", crash_at_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        hashing.main(cfg, data)
    monkeypatch.setattr(hashing, "train_one_epoch", real_epoch)
    resumed = hashing.main(dataclasses.replace(cfg, resume=True), data)
    # Model, optimisers, scheduler and discriminator restored; per-epoch random streams: identical weights.
    assert resumed.bundle.model_id == straight.bundle.model_id


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path, data):
    hashing.main(tiny_config(tmp_path, "run", epochs=1), data)
    with pytest.raises(ValueError, match="epochs: 1 -> 2"):
        hashing.main(tiny_config(tmp_path, "run", epochs=2, resume=True), data)


def test_a_batch_without_same_class_pairs_skips_the_adversary(tmp_path):
    cfg = tiny_config(tmp_path, "x")
    trainer = hashing.build_trainer(cfg, n_classes=4, steps_per_epoch=2)
    x, labels = torch.randn(4, 3, 28, 28), torch.tensor([0, 1, 2, 3])
    terms = hashing.training_step(trainer, x, labels, torch.Generator().manual_seed(0))
    assert "adv" not in terms and np.isfinite(terms["total"])
    terms = hashing.training_step(trainer, x, torch.tensor([0, 0, 1, 1]), torch.Generator().manual_seed(0))
    assert {"adv", "disc"} <= set(terms)


def test_adsh_and_dch_see_the_same_batches(tmp_path, data, monkeypatch):
    seen: dict[str, list] = {"adsh": [], "dch": []}
    real_step = hashing.training_step

    def record(trainer, x, labels, pair_gen):
        seen[trainer.cfg.method].append(x.clone())
        return real_step(trainer, x, labels, pair_gen)

    monkeypatch.setattr(hashing, "training_step", record)
    hashing.main(tiny_config(tmp_path, "a", epochs=1), data)
    hashing.main(tiny_config(tmp_path, "d", epochs=1, no_adversary=True), data)
    assert len(seen["adsh"]) == len(seen["dch"]) == 6
    assert all(torch.equal(a, d) for a, d in zip(seen["adsh"], seen["dch"]))


@pytest.mark.parametrize("overrides", [{"adversary": "prior"}, {"adv_binary": False}])
def test_adversary_variants_train_their_own_discriminator(tmp_path, data, overrides):
    cfg = tiny_config(tmp_path, "v", epochs=1, **overrides)
    trainer = hashing.build_trainer(cfg, n_classes=3, steps_per_epoch=6)
    assert trainer.discriminator.net[0].in_features == cfg.bits + (0 if cfg.adversary == "prior" else 16)
    before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    terms = hashing.training_step(trainer, torch.randn(8, 3, 28, 28), torch.tensor([0, 1] * 4), torch.Generator())
    assert {"adv", "disc"} <= set(terms) and np.isfinite(terms["total"])
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.discriminator.parameters()))
    run = hashing.main(cfg, data)
    assert (
        run.bundle.training["method"] == "adsh"
        and run.bundle.training["config"] | overrides == run.bundle.training["config"]
    )


def test_photo_databases_are_ordered_by_id_hash():
    ids = ("b", "a", "c", "d")
    order = hashing._id_hash_order(ids, np.arange(4))
    keys = [hashlib.sha256(ids[i].encode()).hexdigest() for i in order]
    assert keys == sorted(keys) and sorted(order.tolist()) == [0, 1, 2, 3]


def test_dch_is_the_same_run_without_the_adversary(tmp_path, data):
    run = hashing.main(tiny_config(tmp_path, "dch", no_adversary=True), data)
    assert run.bundle.training["method"] == "dch"
    assert "loss_adv" not in run.bundle.training["history"][0]
    assert hashing.get_args_parser().parse_args(["--no-adversary"]).no_adversary


def test_training_separates_the_classes(tmp_path, data):
    untrained = hashing.main(tiny_config(tmp_path, "one-step", epochs=1, lr=1e-6), data)
    trained = hashing.main(tiny_config(tmp_path, "trained", epochs=20), data)
    assert trained.metrics["map_all"] > 0.7 > 0.5 > untrained.metrics["map_all"]  # 24 queries: noisy
    assert trained.metrics["top1_acc"] > 0.5  # three classes: chance is a third


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="multiple of 8"):
        hashing.cli(["--bits", "12", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="adversary"):
        hashing.cli(["--adversary", "gan", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="dataset"):
        hashing.cli(["--dataset", "mnist", "--out", str(tmp_path / "x")])


def test_the_pipeline_indexes_a_hashing_bundle(tmp_path, data):
    from pipelines.index_catalog import run

    bundle_dir = str(tmp_path / "adsh")
    hashing.main(tiny_config(tmp_path, "adsh", epochs=2), data)
    images = tmp_path / "catalog" / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(12):
        path = images / f"q{i:02d}.png"
        Image.fromarray(data.query_pixels[i, :, :, 0], mode="L").save(path)  # grey PNGs, as a catalog has them
        rows.append({"item_id": f"q{i:02d}", "image_uri": f"images/{path.name}"})
    catalog = str(tmp_path / "catalog" / "catalog.csv")
    with open(catalog, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["item_id", "image_uri"])
        w.writeheader()
        w.writerows(rows)
    out = str(tmp_path / "out")
    report = run(pipeline_flags(catalog, out, bundle_dir, "--num_shards=2", "--batch_size=4", "--run_id=r1"))
    assert report["status"] == "published" and report["counts"]["indexed"] == 12

    features = pq.read_table(glob.glob(f"{out}/features/run=r1/*.parquet")).to_pylist()
    encoder = Encoder.from_bundle(bundle_dir)
    by_id = {r["item_id"]: r for r in features}
    for i in range(12):
        pixels = decode_image(open(images / f"q{i:02d}.png", "rb").read(), encoder.config.preprocessing).pixels
        assert np.array_equal(pixels, data.query_pixels[i])  # the pipeline's decode gives the training pixels
        expected = encoder.encode([pixels])
        assert by_id[f"q{i:02d}"]["hash_code"] == expected.codes[0].tobytes()
        assert by_id[f"q{i:02d}"]["category"] in data.classes
    searcher = Searcher.open(out, bundle=bundle_dir)
    hit = searcher.search_items(["q03"], k=1, mode="hamming")
    assert hit.scores[0][0] == 0 and os.path.exists(os.path.join(out, "CURRENT"))


def test_real_fashion_mnist_slice(tmp_path):
    try:
        fashion_mnist.find_dir()
    except fashion_mnist.FashionMNISTError as e:
        pytest.skip(f"real Fashion-MNIST not installed (make data): {e}")
    cfg = tiny_config(
        tmp_path, "fm", epochs=2, batch_size=64, widths=(8, 16, 16, 16), limit_train=2048, limit_query=256
    )
    run = hashing.main(cfg, hashing.load_data(cfg))
    assert run.bundle.training["database_size"] == 2048 and run.bundle.training["query_size"] == 256
    assert run.bundle.categories == fashion_mnist.CLASSES
    assert run.metrics["map_all"] > 0.4  # ten balanced classes: chance is about 0.1


def test_every_training_flag_defaults_to_its_config_field():
    """The CLI trains what the dataclass says; a field that defaults to True can be turned off."""
    from dataclasses import asdict

    from retrieval_core.train import baseline, gsn, svm_kernel

    for module, config in (
        (hashing, hashing.HashingConfig),
        (gsn, gsn.GSNConfig),
        (svm_kernel, svm_kernel.SVMKernelConfig),
        (baseline, baseline.TrainConfig),
    ):
        parsed = vars(module.get_args_parser().parse_args([]))
        for name, value in asdict(config()).items():
            assert parsed[name] == (list(value) if isinstance(value, tuple) else value), (config.__name__, name)
    assert hashing.HashingConfig().adv_binary
    assert not hashing.get_args_parser().parse_args(["--no-adv_binary"]).adv_binary
