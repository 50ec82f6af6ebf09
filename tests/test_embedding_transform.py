"""A bundle's embedding transform: the helper against numpy by hand, the encoder, the pipeline and the searcher."""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import pipeline_flags, write_catalog

from retrieval_core.bundle import load_bundle, save_bundle
from retrieval_core.embedding_transform import (
    EmbeddingTransformError,
    apply_embedding_transform,
    l2_normalise,
    parse_embedding_transform,
    serve_embeddings,
)
from retrieval_core.encoder import Encoder
from retrieval_core.preprocess import load_image_file, to_model_input
from retrieval_core.rl.expressions import EMBEDDING_GRAMMAR, parse
from retrieval_core.search import Searcher
from retrieval_core.search.searcher import ModelMismatchError
from schemas import feature_schema


def _normalise(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def transformed_bundle(tmp_path_factory, tiny_bundle) -> str:
    config, model = load_bundle(tiny_bundle[0])
    path = str(tmp_path_factory.mktemp("transformed") / "bundle")
    save_bundle(path, model, dataclasses.replace(config, embedding_transform="mul(tanh(x), x)"))
    return path


@pytest.mark.parametrize(
    "text, f",
    [("mul(tanh(x), x)", lambda x: np.tanh(x) * x), ("sign(x)", np.sign), ("add(cube(x), 0.5)", lambda x: x**3 + 0.5)],
)
def test_apply_matches_numpy_by_hand(text, f):
    raw = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32) * 3
    expected = _normalise(f(_normalise(raw)))
    for expression in (text, parse_embedding_transform(text)):
        out = apply_embedding_transform(raw, expression)
        assert out.dtype == np.float32 and out.shape == raw.shape
        np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_apply_names_the_rows_it_cannot_transform():
    raw = np.array([[1.0, -2.0], [3.0, 4.0], [0.0, 0.0], [-1.0, 5.0]], np.float32)
    with pytest.raises(EmbeddingTransformError, match=r"sub\(x, abs\(x\)\) maps rows \[1\] of 4 to the zero vector"):
        apply_embedding_transform(raw, "sub(x, abs(x))")  # zero where x >= 0: row 1 vanishes; row 2 was zero already
    ok = apply_embedding_transform(raw[[0, 2]], "sub(x, abs(x))")
    np.testing.assert_array_equal(ok, [[0.0, -1.0], [0.0, 0.0]])  # a zero row stays zero, as without a transform
    # An Expr is used as is (as text this one is refused up front): float32 overflows where x = 1, not at -0.71.
    overflow = parse("cube(cube(cube(cube(exp(exp(x))))))", EMBEDDING_GRAMMAR)
    with pytest.raises(EmbeddingTransformError, match=r"not finite on rows \[1\] of 2"):
        apply_embedding_transform(np.array([[-1, -1], [1, 0]], np.float32), overflow)
    assert np.isfinite(apply_embedding_transform(np.array([[-1, -1]], np.float32), overflow)).all()


# x^24 and x^36, two units of the grammar: mul(cube(x), cube(x)) = x^6, then squared (or cubed) twice.
POWERS = {
    24: "mul(square(mul(cube(x), cube(x))), square(mul(cube(x), cube(x))))",
    36: "mul(cube(mul(cube(x), cube(x))), cube(mul(cube(x), cube(x))))",
}


@pytest.mark.parametrize("power", sorted(POWERS))
def test_strong_powers_still_serve_unit_vectors(power):
    """On unit 128-dim embeddings x^24 is ~1e-15 and its norm far below any epsilon: every row must still be unit."""
    raw = np.random.default_rng(0).normal(size=(200, 128)).astype(np.float32)
    expr = parse_embedding_transform(POWERS[power])
    out = apply_embedding_transform(raw, expr)
    x = _normalise(raw)
    y = expr.evaluate({"x": x}).astype(np.float64)
    assert np.mean(np.linalg.norm(y, axis=1) < 1e-12) > 0.9  # max(norm, 1e-12) left such rows of norm << 1
    np.testing.assert_allclose(np.linalg.norm(out.astype(np.float64), axis=1), 1.0, atol=1e-6)
    # The oracle: the same float32 values, normalised in float64 (where such norms do not underflow).
    np.testing.assert_allclose(out, y / np.linalg.norm(y, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(serve_embeddings(raw, expr), out, atol=0)


def test_l2_normalise_rows_of_any_magnitude():
    rows = np.array([[3e-30, -4e-30], [3e30, 4e30], [0.0, 0.0], [1e-45, 0.0]], np.float32)
    out = l2_normalise(rows)
    np.testing.assert_allclose(out, [[0.6, -0.8], [0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], atol=1e-7)
    assert out.dtype == np.float32 and l2_normalise(rows, np.float64).dtype == np.float64


def test_serve_embeddings_without_a_transform_normalises():
    raw = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32) * 7
    np.testing.assert_allclose(serve_embeddings(raw), _normalise(raw), atol=1e-7)
    assert np.array_equal(serve_embeddings(raw, ""), serve_embeddings(raw, None))


@pytest.mark.parametrize("text", ["sign(exp(x))", "abs(sign(x))", "sign(square(x))", "sub(x, x)", "mul(x, 0.5)"])
def test_constant_transforms_are_refused(text):
    if text == "mul(x, 0.5)":  # the check is about the values, not the shape of the expression
        assert parse_embedding_transform(text)
        return
    with pytest.raises(EmbeddingTransformError, match="constant"):
        parse_embedding_transform(text)


def test_transforms_constant_only_on_a_half_line_are_accepted():
    for text in ("sub(x, abs(x))", "sign(x)", "max(x, 0.5)"):
        assert str(parse_embedding_transform(text)) == text


def test_encoder_applies_the_transform(transformed_bundle, tiny_bundle):
    plain = Encoder.from_bundle(tiny_bundle[0])
    enc = Encoder.from_bundle(transformed_bundle)
    assert enc.embedding_transform == parse_embedding_transform("mul(tanh(x), x)")
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        raw = enc.model(torch.from_numpy(to_model_input(pixels, enc.config.preprocessing)))["embedding"].numpy()
    x = _normalise(raw)
    out, before = enc.encode(pixels), plain.encode(pixels)
    np.testing.assert_allclose(out.embeddings, _normalise(np.tanh(x) * x), atol=1e-6)
    assert not np.allclose(out.embeddings, before.embeddings, atol=1e-3)  # the transform did something
    np.testing.assert_array_equal(out.codes, before.codes)  # and nothing else changed
    assert out.category == before.category and out.attributes == before.attributes


def _erasing_encoder(tiny_bundle) -> Encoder:
    """The tiny bundle with ``sub(x, abs(x))``, whose model makes the embedding of every bright image (mean
    model input > 0) all-positive: the transform erases exactly those images and serves the others."""
    config, model = load_bundle(tiny_bundle[0])
    config = dataclasses.replace(config, embedding_transform="sub(x, abs(x))", model_id="m-transformed")

    class PositiveWhenBright(torch.nn.Module):
        def forward(self, x):
            out = model(x)
            bright = x.flatten(1).mean(1, keepdim=True) > 0
            return {**out, "embedding": torch.where(bright, out["embedding"].abs(), out["embedding"])}

    return Encoder(config, PositiveWhenBright())


def _bright_and_dark(n: int, bright: set[int]) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 40, (n, 32, 32, 3), dtype=np.uint8)
    pixels[sorted(bright)] = 255
    return pixels


def test_encoder_error_names_bundle_and_expression(tiny_bundle):
    message = r"bundle m-transformed: .*sub\(x, abs\(x\)\) maps rows \[0, 2\] of 3"
    with pytest.raises(EmbeddingTransformError, match=message):
        _erasing_encoder(tiny_bundle).encode(_bright_and_dark(3, {0, 2}))


def test_encoder_row_errors_fail_only_the_images_the_transform_cannot_serve(tiny_bundle):
    enc = _erasing_encoder(tiny_bundle)
    pixels = _bright_and_dark(5, {1, 3})
    out = enc.encode(pixels, row_errors=True)
    assert sorted(out.errors) == [1, 3]
    assert out.errors[1] == (
        "bundle m-transformed: embedding transform sub(x, abs(x)) maps this image's embedding to the zero vector"
    )
    assert not out.embeddings[[1, 3]].any()
    good = enc.encode(pixels[[0, 2, 4]])  # the others: exactly what a batch without the bad images gives
    assert good.errors == {}
    np.testing.assert_allclose(out.embeddings[[0, 2, 4]], good.embeddings, atol=1e-6)
    np.testing.assert_array_equal(out.codes[[0, 2, 4]], good.codes)
    assert enc.encode(pixels[[0, 2, 4]], row_errors=True).errors == {}


def test_embed_dead_letters_only_the_images_the_transform_cannot_serve(tiny_bundle, monkeypatch):
    import datetime as dt

    import apache_beam as beam
    from apache_beam.testing.util import assert_that

    from pipelines.transforms.inference import Embed

    enc = _erasing_encoder(tiny_bundle)
    monkeypatch.setattr(Encoder, "from_bundle", classmethod(lambda cls, bundle_dir, device="cpu": enc))
    pixels = _bright_and_dark(6, {2, 5})
    meta = [
        {
            "item_id": f"i{i}",
            "image_uri": f"mem://i{i}.jpg",
            "content_sha256": f"{i:064x}",
            "width": 32,
            "height": 32,
            "catalog": {},
            "source_stamp": "s",
        }
        for i in range(6)
    ]

    def rows_are(expected_ids):
        def check(rows):
            assert sorted(r["item_id"] for r in rows) == expected_ids
            assert all(abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5 for r in rows)

        return check

    def dead_letters_are(expected_ids):
        def check(rows):
            assert sorted(r["item_id"] for r in rows) == expected_ids
            for r in rows:
                assert r["stage"] == "inference" and r["error_type"] == "EmbeddingTransformError", r
                assert "maps this image's embedding to the zero vector" in r["error_message"], r

        return check

    schema = feature_schema(enc.config.embedding_dim, enc.config.hash_bits)
    with beam.Pipeline("DirectRunner") as p:
        # Two batches, as ReadAndDecode cuts them: one bad image in each.
        decoded = p | beam.Create([(meta[:4], list(pixels[:4])), (meta[4:], list(pixels[4:]))])
        batches, dead = decoded | Embed(tiny_bundle[0], "cpu", "r1", dt.datetime(2026, 1, 1), schema)
        rows = batches | beam.FlatMap(lambda b: b.to_pylist())
        assert_that(rows, rows_are(["i0", "i1", "i3", "i4"]), label="rows")
        assert_that(dead, dead_letters_are(["i2", "i5"]), label="dead")


def test_pipeline_and_searcher_use_the_transform(tmp_path, transformed_bundle, tiny_bundle):
    from pipelines.index_catalog import run

    catalog, expect = write_catalog(str(tmp_path / "c"), 4, broken=False, duplicate=False)
    out = str(tmp_path / "out")
    report = run(pipeline_flags(catalog, out, transformed_bundle, "--num_shards=1", "--batch_size=4", "--run_id=r1"))
    assert report["counts"]["indexed"] == 4

    searcher = Searcher.open(out, bundle=transformed_bundle)
    assert searcher.manifest.model_id == searcher.encoder.config.model_id != tiny_bundle[1].model_id
    features = {r["item_id"]: r for r in pq.read_table(glob.glob(f"{out}/features/run=r1/*.parquet")).to_pylist()}
    images = [os.path.join(str(tmp_path / "c"), "images", f"good{i:03d}.jpg") for i in range(4)]
    queries = searcher.encode_images(images).embeddings
    stored = np.array([features[item]["embedding"] for item in expect["good"]], np.float32)
    np.testing.assert_allclose(stored, queries, atol=1e-6)
    # ... and are the untransformed bundle's features, transformed.
    pixels = [load_image_file(path, searcher.encoder.config.preprocessing).pixels for path in images]
    plain = Encoder.from_bundle(tiny_bundle[0]).encode(pixels).embeddings
    np.testing.assert_allclose(stored, apply_embedding_transform(plain, "mul(tanh(x), x)"), atol=1e-5)
    result = searcher.search_images(images, k=1)
    assert [r[0] for r in result.item_ids] == expect["good"] and np.allclose(result.scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ModelMismatchError):
        Searcher.open(out, bundle=tiny_bundle[0])
