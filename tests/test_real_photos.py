"""Listing and decoding of the real photo datasets (skipped where they are not present)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_core.data import real_photos as rp
from retrieval_core.data.paths import data_root, dataset_dir
from retrieval_core.preprocess import Preprocessing


def _require(name: str) -> None:
    if not dataset_dir(name).is_dir():
        pytest.skip(f"{name} not found under {data_root()} (set RETRIEVAL_DATA_DIR to the datasets folder)")


@pytest.fixture(scope="module")
def product_split() -> tuple[rp.LabelledFiles, rp.LabelledFiles]:
    _require("fashion-product-small")
    return rp.fashion_product_split(seed=0)


def test_data_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_DATA_DIR", str(tmp_path))
    assert dataset_dir("clothing-small") == tmp_path / "clothing-small"
    monkeypatch.delenv("RETRIEVAL_DATA_DIR")
    assert data_root().name == "datasets" and data_root().parent.name == "shared"


def test_clothing_small_splits_share_one_vocabulary():
    _require("clothing-small")
    train, val = rp.clothing_small("train"), rp.clothing_small("validation")
    assert (len(train), len(val)) == (3068, 341)
    assert len(train.classes) == 10 and train.classes == val.classes == tuple(sorted(train.classes))
    for part in (train, val):
        assert part.labels.dtype == np.int64 and len(part.labels) == len(part.paths) == len(part.ids)
        assert set(np.unique(part.labels)) == set(range(10))
        # Sorted by (class, file name), and every file sits in its label's folder.
        keys = [(int(y), p.rsplit("/", 1)[1]) for y, p in zip(part.labels, part.paths)]
        assert keys == sorted(keys)
        assert all(p.split("/")[-2] == part.classes[y] for y, p in zip(part.labels[:50], part.paths[:50]))
    again = rp.clothing_small("train")
    assert again.paths == train.paths and np.array_equal(again.labels, train.labels)


def test_clothing_small_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="RETRIEVAL_DATA_DIR") as info:
        rp.clothing_small("train", tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value)
    with pytest.raises(ValueError, match="split"):
        rp.clothing_small("test", tmp_path)


def test_clothing_small_rejects_a_validation_class_unknown_to_train(tmp_path):
    for split, cls in (("train", "dress"), ("validation", "dress"), ("validation", "cape")):
        (tmp_path / split / cls).mkdir(parents=True)
        (tmp_path / split / cls / "a.jpg").write_bytes(b"x")
    assert rp.clothing_small("train", tmp_path).classes == ("dress",)
    with pytest.raises(ValueError, match="cape"):
        rp.clothing_small("validation", tmp_path)


def test_fashion_product_split_is_a_seeded_partition(product_split):
    queries, database = product_split
    n = len(queries) + len(database)
    assert n == 39680  # every row with an image has an articleType
    assert not set(queries.ids) & set(database.ids)
    assert queries.classes == database.classes == tuple(sorted(queries.classes))
    assert abs(len(queries) / n - 0.1) < 0.001
    for part in (queries, database):
        assert [int(i) for i in part.ids] == sorted(int(i) for i in part.ids)
        assert all(p.endswith(f"/images/{i}.jpg") for p, i in zip(part.paths[:50], part.ids[:50]))
        assert part.labels.dtype == np.int64 and part.labels.max() < len(part.classes)
    again, _ = rp.fashion_product_split(seed=0)
    other, _ = rp.fashion_product_split(seed=1)
    assert again.ids == queries.ids and other.ids != queries.ids


def test_fashion_product_split_skips_malformed_and_unlabelled_rows(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    for i in (1, 2, 3, 4, 5, 10):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(b"x")
    (tmp_path / "styles.csv").write_text(
        "id,gender,articleType,usage\r\n"
        "10,Men,Shirts,Casual\r\n"
        "2,Women,Tops,\r\n"
        "3,Men,NA,Casual\r\n"  # no label
        "4,Men,,Casual\r\n"  # no label
        "5,Men,Shirts,Casual,extra\r\n"  # malformed: one field too many
        "x,Men,Shirts,Casual\r\n"  # malformed: id
        "2,Men,Shirts,Casual\r\n"  # malformed: repeated id
        "7,Men,Shirts,Casual\r\n"  # no image
        "1,Men,Tops,Casual\r\n",
        encoding="utf-8",
    )
    queries, database = rp.fashion_product_split(seed=0, query_fraction=0.34, data_dir=tmp_path)
    assert sorted(queries.ids + database.ids, key=int) == ["1", "2", "10"]
    assert len(queries) == 1 and queries.classes == ("Shirts", "Tops")
    assert "skipped 3 malformed rows" in caplog.text
    with pytest.raises(ValueError, match="colour"):
        rp.fashion_product_split(label="colour", data_dir=tmp_path)


def test_decode_files_caches_and_tolerates_a_corrupt_file(tmp_path, monkeypatch, caplog, product_split):
    _, database = product_split
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"not really a jpeg" * 20)
    paths = [*database.paths[:2], str(bad), *database.paths[2:5]]
    prep = Preprocessing(image_size=32)
    cache = tmp_path / "cache"

    pixels, ok = rp.decode_files(paths, prep, cache_dir=str(cache))
    assert ok.tolist() == [True, True, False, True, True, True]
    assert pixels.shape == (5, 32, 32, 3) and pixels.dtype == np.uint8 and pixels.std() > 0
    assert "1 of 6 files did not decode {'corrupt': 1}" in caplog.text
    assert [p.suffix for p in cache.iterdir()] == [".npz"]  # no temp file left behind

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the result")

    monkeypatch.setattr(rp, "load_image_file", no_decoding)
    cached_pixels, cached_ok = rp.decode_files(paths, prep, cache_dir=str(cache))
    np.testing.assert_array_equal(cached_pixels, pixels)
    np.testing.assert_array_equal(cached_ok, ok)
    with pytest.raises(AssertionError, match="decoded although"):  # other preprocessing: another key
        rp.decode_files(paths, Preprocessing(image_size=16), cache_dir=str(cache))


def test_decode_photos_long_side_keeps_the_aspect_and_caches(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from retrieval_core.preprocess import load_image_file, resize_long_side

    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in {"portrait": (120, 90), "landscape": (50, 300), "small": (20, 16)}.items():
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"not really a jpeg" * 20)
    paths.insert(1, str(bad))
    cache = tmp_path / "cache"

    photos, ok = rp.decode_photos_long_side(paths, 64, cache_dir=str(cache))
    assert ok.tolist() == [True, False, True, True]
    assert [p.shape for p in photos] == [(64, 48, 3), (11, 64, 3), (64, 51, 3)]  # no letterbox, no square
    for photo, path in zip(photos, [paths[0], paths[2], paths[3]]):  # the pipeline's decoder, then the resize
        expected = resize_long_side(Image.fromarray(load_image_file(path).pixels), 64)
        np.testing.assert_array_equal(photo, np.asarray(expected))
    assert "1 of 4 files did not decode" in caplog.text

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the result")

    monkeypatch.setattr(rp, "load_image_file", no_decoding)
    cached, cached_ok = rp.decode_photos_long_side(paths, 64, cache_dir=str(cache))
    np.testing.assert_array_equal(cached_ok, ok)
    assert all(np.array_equal(a, b) for a, b in zip(cached, photos)) and len(cached) == len(photos)
    with pytest.raises(AssertionError, match="decoded although"):  # another long side: another key
        rp.decode_photos_long_side(paths, 32, cache_dir=str(cache))
