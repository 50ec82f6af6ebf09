"""Shared fixtures: a tiny untrained bundle and tiny catalogs of good and broken images."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_core.bundle import BundleConfig, save_bundle
from retrieval_core.models import create_model
from retrieval_core.preprocess import Preprocessing

LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def pipeline_flags(catalog: str, out: str, bundle: str, *extra: str) -> list[str]:
    """Flags of an indexing run on the local runner; ``extra`` adds or sets the rest (shards, run id, ...)."""
    return [f"--catalog={catalog}", f"--output={out}", f"--bundle={bundle}", f"--runner={LOCAL_RUNNER}", *extra]


TINY_CONFIG = {
    "embedding_dim": 16,
    "hash_bits": 16,
    "num_categories": 3,
    "attribute_classes": {"colour": 2},
    "widths": [4, 8, 8, 8],
}


def make_tiny_bundle(path: str, seed: int = 0) -> BundleConfig:
    """A real (untrained, seeded) bundle small enough for fast pipeline tests."""
    torch.manual_seed(seed)
    model = create_model("baseline_cnn", **TINY_CONFIG)
    # Calibrate BatchNorm statistics on random inputs: at init the activations shrink layer by layer and
    # every image would get the same embedding; calibrated, the untrained net separates images.
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, 32, 32))
    model.eval()
    config = BundleConfig(
        model_name="baseline_cnn",
        model_config=TINY_CONFIG,
        preprocessing=Preprocessing(image_size=32),
        embedding_dim=16,
        hash_bits=16,
        categories=("a", "b", "c"),
        attributes={"colour": ("red", "blue")},
        training={"note": f"untrained test bundle, seed {seed}"},
    )
    return save_bundle(path, model, config)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> tuple[str, BundleConfig]:
    path = str(tmp_path_factory.mktemp("bundle") / "tiny")
    return path, make_tiny_bundle(path)


def jpeg_bytes(seed: int, size=(48, 40), mode="RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    # Blocky content, so different seeds give clearly different images (and embeddings).
    arr = np.kron(arr[::8, ::8], np.ones((8, 8, 1), np.uint8))[: size[1], : size[0]]
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def broken_images() -> dict[str, bytes | None]:
    """Name -> file bytes of inputs that must end as dead-letter rows (None: the file is missing)."""
    good = jpeg_bytes(99)
    return {
        "truncated.jpg": good[: len(good) // 2],
        "zero.jpg": b"",
        "html.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "tiny.png": png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))),
        "missing.jpg": None,
    }


def write_catalog(root: str, n_good: int, *, broken: bool = True, duplicate: bool = True) -> tuple[str, dict]:
    """A CSV catalog of ``n_good`` decodable images plus broken ones. Returns (path, expectations)."""
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    rows, good_ids, bad_ids = [], [], []
    for i in range(n_good):
        name = f"good{i:03d}.jpg"
        with open(os.path.join(img_dir, name), "wb") as f:
            f.write(jpeg_bytes(i))
        rows.append({"item_id": f"item{i:03d}", "image_uri": f"images/{name}", "product_id": f"p{i // 2}"})
        good_ids.append(f"item{i:03d}")
    if broken:
        for name, data in broken_images().items():
            if data is not None:
                with open(os.path.join(img_dir, name), "wb") as f:
                    f.write(data)
            item = "bad-" + name.split(".")[0]
            rows.append({"item_id": item, "image_uri": f"images/{name}", "product_id": "bad"})
            bad_ids.append(item)
    dup_rows = 0
    if duplicate and n_good:
        rows.append({"item_id": "item000", "image_uri": "images/good001.jpg", "product_id": "dup"})
        rows.append({"item_id": "", "image_uri": "images/good001.jpg", "product_id": "noid"})
        dup_rows = 2
    path = os.path.join(root, "catalog.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["item_id", "image_uri", "product_id"])
        w.writeheader()
        w.writerows(rows)
    return path, {"good": good_ids, "bad": bad_ids, "catalog_errors": dup_rows}


def feature_rows(n: int, dim: int, bits: int) -> list[dict]:
    """``n`` valid rows of the feature table (``schemas.feature_schema(dim, bits)``): item ``i{k}`` has
    embedding ``[k] * dim``, code byte ``k % 256`` and content hash ``sha256-{k}``."""
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    return [
        {
            "item_id": f"i{i}",
            "image_uri": f"gs://b/{i}.jpg",
            "content_sha256": f"sha256-{i}",
            "model_id": "m",
            "embedding": [float(i)] * dim,
            "hash_code": bytes([i % 256]) * (bits // 8),
            "category": "dress",
            "category_score": 0.5,
            "attributes": [("colour", "red")],
            "width": 10,
            "height": 20,
            "catalog": [("product_id", "p1")],
            "run_id": "r",
            "indexed_at": now,
        }
        for i in range(n)
    ]
