"""The consumer-class -> shop-articleType table: complete, one owner per article type, and true to the data."""

from __future__ import annotations

import csv

import pytest

from retrieval_core.data.consumer_shop import (
    CONSUMER_CLASSES,
    CONSUMER_TO_SHOP,
    EXCLUDED_ARTICLE_TYPES,
    UNMAPPED,
    shop_article_types,
)
from retrieval_core.data.paths import data_root, dataset_dir


def require(name: str):
    if not dataset_dir(name).is_dir():
        pytest.skip(f"{name} not found under {data_root()} (set RETRIEVAL_DATA_DIR to the datasets folder)")
    return dataset_dir(name)


def article_types_in_styles_csv() -> set[str]:
    with open(require("fashion-product-small") / "styles.csv", newline="", encoding="utf-8") as f:
        return {row["articleType"].strip() for row in csv.DictReader(f) if row.get("articleType")}


def test_every_class_is_mapped_or_explicitly_unmapped():
    types = shop_article_types()
    assert set(types.article_types) | set(types.unmapped) == set(CONSUMER_CLASSES)
    assert not set(types.article_types) & set(types.unmapped)
    assert all(UNMAPPED[c] for c in types.unmapped)  # every unmapped class says why


def test_no_article_type_belongs_to_two_classes():
    owners: dict[str, list[str]] = {}
    for c, ts in CONSUMER_TO_SHOP.items():
        for t in ts:
            owners.setdefault(t, []).append(c)
    assert all(len(cs) == 1 for cs in owners.values()), {t: cs for t, cs in owners.items() if len(cs) > 1}
    assert len(shop_article_types().class_of()) == sum(len(ts) for ts in CONSUMER_TO_SHOP.values())
    assert not set(owners) & set(EXCLUDED_ARTICLE_TYPES)  # a type is either mapped or excluded, never both


def test_bad_mappings_are_refused():
    classes = ("a", "b")
    with pytest.raises(ValueError, match="both 'a' and 'b'"):
        shop_article_types({"a": ("X",), "b": ("X",)}, {}, classes)
    with pytest.raises(ValueError, match="neither mapped"):
        shop_article_types({"a": ("X",)}, {}, classes)
    with pytest.raises(ValueError, match="both mapped and unmapped"):
        shop_article_types({"a": ("X",), "b": ("Y",)}, {"b": "no such thing"}, classes)
    with pytest.raises(ValueError, match="not consumer classes"):
        shop_article_types({"a": ("X",), "b": ("Y",), "c": ("Z",)}, {}, classes)
    with pytest.raises(ValueError, match="no article type"):
        shop_article_types({"a": ("X",), "b": ()}, {}, classes)
    types = shop_article_types({"a": ("X", "Y")}, {"b": "no shop counterpart"}, classes)
    assert types.unmapped == ("b",) and types.class_of() == {"X": "a", "Y": "a"}


def test_every_mapped_and_excluded_article_type_exists_in_styles_csv():
    present = article_types_in_styles_csv()
    mapped = {t for ts in CONSUMER_TO_SHOP.values() for t in ts}
    assert not mapped - present, sorted(mapped - present)
    assert not set(EXCLUDED_ARTICLE_TYPES) - present, sorted(set(EXCLUDED_ARTICLE_TYPES) - present)


def test_the_classes_are_clothing_small_s_class_folders():
    train = require("clothing-small") / "train"
    folders = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert tuple(folders) == CONSUMER_CLASSES
