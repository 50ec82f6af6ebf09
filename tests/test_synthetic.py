"""Tests of the embedded procedural catalog: layout, determinism, caching and a visual sanity oracle."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from retrieval_core.data import synthetic
from retrieval_core.data.synthetic import (
    ATTRIBUTE_COLUMNS,
    ATTRIBUTE_VALUES,
    CATALOG_COLUMNS,
    CATEGORIES,
    COLOURS,
    PATTERNS,
    SyntheticConfig,
    generate_catalog,
)

TINY = SyntheticConfig(products_per_category=2, consumer_views=2, image_size=48, seed=3)


def _rows(catalog: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with catalog.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _digests(root: pathlib.Path) -> dict[str, str]:
    files = [root / "catalog.csv", *sorted((root / "images").iterdir())]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return generate_catalog(tmp_path_factory.mktemp("tiny"), TINY)


def test_vocabularies() -> None:
    assert len(CATEGORIES) >= 8 and len(set(CATEGORIES)) == len(CATEGORIES)
    assert len(COLOURS) >= 8 and len(PATTERNS) >= 4
    assert ATTRIBUTE_COLUMNS[:3] == ("colour", "pattern", "sleeve_length")
    assert CATALOG_COLUMNS == ("item_id", "product_id", "image_uri", "view", "category", *ATTRIBUTE_COLUMNS)
    assert set(ATTRIBUTE_VALUES) == set(ATTRIBUTE_COLUMNS)


def test_catalog_layout(tiny: pathlib.Path) -> None:
    header, rows = _rows(tiny)
    assert tuple(header) == CATALOG_COLUMNS
    assert len(rows) == len(CATEGORIES) * TINY.products_per_category * (1 + TINY.consumer_views)
    ids = [r["item_id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for r in rows:
        assert r["image_uri"] == f"images/{r['item_id']}.jpg"  # relative to the catalog's folder
        with Image.open(tiny.parent / r["image_uri"]) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (TINY.image_size, TINY.image_size))
        assert r["item_id"].startswith(r["product_id"] + "-")
        assert r["category"] in CATEGORIES
        for column in ATTRIBUTE_COLUMNS:
            assert r[column] in ATTRIBUTE_VALUES[column], (column, r[column])
        if r["category"] not in ("tshirt", "longsleeve", "dress", "jacket"):
            assert r["sleeve_length"] == "none"
    by_product: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_product.setdefault(r["product_id"], []).append(r)
    for views in by_product.values():
        assert [v["view"] for v in views].count("shop") == 1
        assert [v["view"] for v in views].count("consumer") == TINY.consumer_views
        # every view of a product carries the same labels
        assert len({tuple(v[c] for c in ("category", *ATTRIBUTE_COLUMNS)) for v in views}) == 1
    assert {r["category"] for r in rows} == set(CATEGORIES)


def test_deterministic_and_seed_dependent(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = generate_catalog(tmp_path / "again", TINY)
    assert _digests(again.parent) == _digests(tiny.parent)
    other = generate_catalog(tmp_path / "other", dataclasses.replace(TINY, seed=TINY.seed + 1))
    first, second = _digests(tiny.parent), _digests(other.parent)
    images = [name for name in first if name.endswith(".jpg")]
    assert sum(first[n] != second[n] for n in images) == len(images)


def test_products_do_not_depend_on_catalog_size(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # Each product has its own rng, so a smaller catalog is a byte-identical prefix of a larger one.
    small = generate_catalog(tmp_path, dataclasses.replace(TINY, products_per_category=1))
    small_digests, big_digests = _digests(small.parent), _digests(tiny.parent)
    images = [name for name in small_digests if name.endswith(".jpg")]
    assert len(images) == len(CATEGORIES) * (1 + TINY.consumer_views)
    assert all(small_digests[n] == big_digests[n] for n in images)


def test_second_call_reuses_the_catalog(tmp_path: pathlib.Path) -> None:
    config = SyntheticConfig(products_per_category=1, consumer_views=1, image_size=32)
    catalog = generate_catalog(tmp_path, config)
    files = [catalog, *sorted((tmp_path / "images").iterdir())]
    before = [p.stat().st_mtime_ns for p in files]
    assert generate_catalog(tmp_path, config) == catalog
    assert [p.stat().st_mtime_ns for p in files] == before
    # a different config is regenerated in place
    generate_catalog(tmp_path, dataclasses.replace(config, seed=9))
    assert json.loads((tmp_path / ".synthetic.json").read_text())["config"]["seed"] == 9
    assert catalog.stat().st_mtime_ns != before[0]


def test_interrupted_run_leaves_no_catalog(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = SyntheticConfig(products_per_category=1, consumer_views=1, image_size=32)
    generate_catalog(tmp_path, config)
    real, calls = synthetic.render_product_views, []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_product_views", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_catalog(tmp_path, dataclasses.replace(config, seed=1))
    assert not (tmp_path / "catalog.csv").exists()
    monkeypatch.undo()
    assert generate_catalog(tmp_path, config).is_file()


def test_cli(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic.main(["--out", str(tmp_path), "--products_per_category", "1", "--consumer_views", "1"])
    out = capsys.readouterr().out
    assert f"{len(CATEGORIES) * 2} images" in out and str(tmp_path / "catalog.csv") in out


def test_views_of_a_product_look_alike(tmp_path: pathlib.Path) -> None:
    """Crude colour oracle: a consumer view's centre colour finds a shop view of its own colour.

    Chance level is about 1 / len(COLOURS); a generator whose consumer views lost their product's
    colour (or whose labels disagree with the pixels) falls far below the thresholds.
    """
    config = SyntheticConfig(products_per_category=6, consumer_views=2, image_size=64)
    catalog = generate_catalog(tmp_path, config)
    _, rows = _rows(catalog)

    def centre_colour(row: dict[str, str]) -> np.ndarray:
        with Image.open(tmp_path / row["image_uri"]) as im:
            small = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR), np.float64)
        return np.median(small[6:10, 6:10].reshape(-1, 3), axis=0)  # the garment is (mostly) there

    shops = [r for r in rows if r["view"] == "shop"]
    consumers = [r for r in rows if r["view"] == "consumer"]
    shop_features = np.stack([centre_colour(r) for r in shops])
    own_shop = {r["product_id"]: i for i, r in enumerate(shops)}
    same_colour = closer_than_median = 0
    for r in consumers:
        distances = np.abs(shop_features - centre_colour(r)).sum(axis=1)
        same_colour += shops[int(distances.argmin())]["colour"] == r["colour"]
        closer_than_median += distances[own_shop[r["product_id"]]] < np.median(distances)
    assert same_colour / len(consumers) > 0.6
    assert closer_than_median / len(consumers) > 0.8
