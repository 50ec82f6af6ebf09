"""The consumer-view distortions: seeded, size-preserving, switchable step by step, and not too strong."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from retrieval_core.data.distortions import DistortionRecipe, distort, distort_many, jpeg_roundtrip


def garment_photos(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """``n`` synthetic "photos": a textured, coloured garment-like blob on a plain background of another colour."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    photos = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        background, garment = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        cx, cy, rx, ry = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.35), rng.uniform(0.25, 0.4)
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
        stripes = 0.85 + 0.15 * np.sin(2 * np.pi * rng.integers(2, 6) * (xs + ys))
        img = np.where(inside[..., None], garment * stripes[..., None], background)
        photos[i] = np.clip(img + rng.normal(0, 3, size=img.shape), 0, 255).astype(np.uint8)
    return photos


def colour_histogram(pixels: np.ndarray, bins: int = 4) -> np.ndarray:
    q = (pixels.reshape(-1, 3).astype(np.int64) * bins) // 256
    h = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(np.float64)
    return h / h.sum()


def thumbnail(pixels: np.ndarray, side: int = 8) -> np.ndarray:
    s = pixels.shape[0] // side
    return pixels[: s * side, : s * side].reshape(side, s, side, s, 3).mean(axis=(1, 3)).ravel() / 255.0


ALL_STEPS = ("crop", "rotation", "perspective", "scale", "colour", "occlusion", "jpeg")


def test_same_seed_and_key_give_the_same_view_and_others_differ():
    img = garment_photos(1)[0]
    a = distort(img, "item-1", seed=3)
    assert np.array_equal(a, distort(img, "item-1", seed=3))
    assert not np.array_equal(a, distort(img, "item-2", seed=3))
    assert not np.array_equal(a, distort(img, "item-1", seed=4))


@pytest.mark.parametrize("shape", [(48, 48, 3), (40, 30, 3), (9, 17, 3)])
def test_shape_and_dtype_are_kept(shape):
    img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    for key in range(5):
        out = distort(img, key)
        assert out.shape == shape and out.dtype == np.uint8


def test_rejects_other_inputs():
    with pytest.raises(ValueError):
        distort(np.zeros((8, 8, 3), dtype=np.float32), "k")
    with pytest.raises(ValueError):
        distort(np.zeros((8, 8), dtype=np.uint8), "k")
    with pytest.raises(ValueError):
        DistortionRecipe(crop_area=(0.9, 0.5))
    with pytest.raises(ValueError):
        DistortionRecipe(occluder_kinds=("paint",))


def retrieval_of_views(recipe: DistortionRecipe, describe) -> tuple[float, float]:
    """(share of views whose nearest original is their own, mean own distance / mean distance to the others)."""
    photos = garment_photos(12)
    originals = np.stack([describe(p) for p in photos])
    hits, own, other = 0, [], []
    for i, p in enumerate(photos):
        for k in range(3):
            d = np.abs(originals - describe(distort(p, f"{i}/{k}", seed=0, recipe=recipe))).sum(axis=1)
            hits += int(np.argmin(d) == i)
            own.append(d[i])
            other.append(np.delete(d, i).mean())
    return hits / (3 * len(photos)), float(np.mean(own) / np.mean(other))


# A 4-bin colour histogram is coarse (a colour shift moves pixels across bin edges): looser bounds.
@pytest.mark.parametrize(("describe", "min_hits", "max_ratio"), [(thumbnail, 0.9, 0.45), (colour_histogram, 0.7, 0.7)])
def test_a_view_is_nearer_its_own_photo_than_the_others(describe, min_hits, max_ratio):
    hits, ratio = retrieval_of_views(DistortionRecipe(), describe)
    assert hits >= min_hits and ratio <= max_ratio


def test_the_nearness_check_fails_for_a_recipe_that_destroys_the_garment():
    """The check above can fail: a view with a random hue, a tenth of the picture and half of it covered."""
    wrecked = DistortionRecipe(max_hue_deg=180, crop_area=(0.1, 0.3), occlusion_prob=1.0, occlusion_area=(0.5, 0.9))
    hits, ratio = retrieval_of_views(wrecked, thumbnail)
    assert hits < 0.5 and ratio > 0.8


def test_all_steps_off_is_the_identity_and_a_copy():
    img = garment_photos(1)[0]
    out = distort(img, "k", recipe=DistortionRecipe.none())
    assert np.array_equal(out, img) and out is not img
    only_jpeg = distort(img, "k", recipe=replace(DistortionRecipe.none(), jpeg=True), return_params=True)
    assert np.array_equal(only_jpeg[0], jpeg_roundtrip(img, only_jpeg[1].jpeg_quality))
    assert only_jpeg[1].applied == ("jpeg",)


@pytest.mark.parametrize("step", ALL_STEPS)
def test_each_step_alone_changes_the_picture_and_is_reported(step):
    img = garment_photos(1)[0]
    recipe = replace(DistortionRecipe.none(), **{step: True}, occlusion_prob=1.0)
    out, params = distort(img, "k", recipe=recipe, return_params=True)
    assert params.applied == (step,)
    assert not np.array_equal(out, img)


@pytest.mark.parametrize("step", ALL_STEPS)
def test_switching_one_step_off_keeps_the_other_steps_parameters(step):
    img = garment_photos(1)[0]
    _, full = distort(img, "k", recipe=DistortionRecipe(occlusion_prob=1.0), return_params=True)
    _, less = distort(img, "k", recipe=DistortionRecipe(occlusion_prob=1.0, **{step: False}), return_params=True)
    assert step not in less.applied and step in full.applied
    assert replace(less, applied=(), occlusion_box=None, occluder_kind=None) == replace(
        full, applied=(), occlusion_box=None, occluder_kind=None
    )


def test_occlusion_stays_inside_its_box_and_within_the_area_bound():
    grey = np.full((50, 40, 3), 128, dtype=np.uint8)
    recipe = replace(DistortionRecipe.none(), occlusion=True, occlusion_prob=1.0, occluder_kinds=("solid", "skin"))
    areas = []
    for key in range(40):
        out, params = distort(grey, key, recipe=recipe, return_params=True)
        x0, y0, x1, y1 = params.occlusion_box
        area = (x1 - x0) * (y1 - y0) / (50 * 40)
        assert recipe.occlusion_area[0] * 0.8 <= area <= recipe.occlusion_area[1]
        changed = np.any(out != grey, axis=2)
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()
        assert changed.sum() > 0.5 * (x1 - x0) * (y1 - y0)  # the occluder is really there
        areas.append(area)
    assert max(areas) > 0.1  # the range is used, not just its low end


def test_occlusion_probability_is_honoured():
    img = garment_photos(1)[0]
    occluded = [distort(img, k, return_params=True)[1].occlusion_box is not None for k in range(200)]
    assert 0.35 < np.mean(occluded) < 0.65
    never = replace(DistortionRecipe(), occlusion_prob=0.0)
    assert all(distort(img, k, recipe=never, return_params=True)[1].occlusion_box is None for k in range(20))


def test_geometry_keeps_most_of_the_picture_and_bounded_tilt():
    img = garment_photos(1)[0]
    recipe = DistortionRecipe()
    for key in range(50):
        params = distort(img, key, return_params=True)[1]
        x0, y0, x1, y1 = params.crop_box
        assert (x1 - x0) * (y1 - y0) >= recipe.crop_area[0] * 48 * 48 - 1e-6
        assert 0 <= x0 and 0 <= y0 and x1 <= 48 + 1e-9 and y1 <= 48 + 1e-9
        assert abs(params.rotation_deg) <= recipe.max_rotation_deg
        assert recipe.scale_range[0] <= params.scale <= recipe.scale_range[1]


def test_a_blank_picture_stays_blank_under_geometry():
    """The uncovered background takes the border's colour: no black wedges a phone would never show."""
    white = np.full((32, 32, 3), 255, dtype=np.uint8)
    recipe = replace(DistortionRecipe(), colour=False, occlusion=False, jpeg=False)
    for key in range(5):
        assert np.array_equal(distort(white, key, recipe=recipe), white)


def test_jpeg_really_recompresses_within_its_quality_bounds():
    img = garment_photos(1)[0]
    recipe = replace(DistortionRecipe.none(), jpeg=True, jpeg_quality=(40, 60))
    qualities = set()
    for key in range(30):
        out, params = distort(img, key, recipe=recipe, return_params=True)
        assert 40 <= params.jpeg_quality <= 60
        assert np.array_equal(out, jpeg_roundtrip(img, params.jpeg_quality))
        assert not np.array_equal(out, img)
        qualities.add(params.jpeg_quality)
    assert len(qualities) > 5
    low, high = jpeg_roundtrip(img, 10).astype(int), jpeg_roundtrip(img, 95).astype(int)
    assert np.abs(low - img).mean() > np.abs(high - img).mean()


def test_distort_many_matches_distort():
    photos = garment_photos(3)
    keys = ["a", "b", "c"]
    out = distort_many(photos, keys, seed=2)
    for i, k in enumerate(keys):
        assert np.array_equal(out[i], distort(photos[i], k, seed=2))
    with pytest.raises(ValueError):
        distort_many(photos, keys[:2])


def _recolour_step_by_step(pixels: np.ndarray, p) -> np.ndarray:
    """The colour step as its docstring states it, one operation after another, in float64."""
    h, w = pixels.shape[:2]
    x = pixels.astype(np.float64) * np.array(p.white_balance)
    strength, direction = p.light_gradient
    ys, xs = np.mgrid[0:h, 0:w]
    t = np.deg2rad(direction)
    along = (xs + 0.5 - w / 2) * np.cos(t) + (ys + 0.5 - h / 2) * np.sin(t)
    x *= (1.0 + strength * along / (np.hypot(w, h) / 2))[..., None]
    x *= p.brightness
    luma = x @ np.array([0.299, 0.587, 0.114])
    x = luma.mean() + p.contrast * (x - luma.mean())
    luma = x @ np.array([0.299, 0.587, 0.114])
    x = luma[..., None] + p.saturation * (x - luma[..., None])
    angle = np.deg2rad(p.hue_deg)
    u = np.ones(3) / np.sqrt(3.0)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    hue = np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(u, u)
    x = x @ hue.T
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_colour_matches_the_step_by_step_formula():
    from retrieval_core.data.distortions import _recolour

    rng = np.random.default_rng(0)
    differing = 0
    for k in range(20):
        img = rng.integers(0, 256, (40 + k, 30, 3), dtype=np.uint8)  # not square: the gradient's axes matter
        params = distort(img, k, recipe=DistortionRecipe(max_hue_deg=90, max_light_gradient=0.5), return_params=True)[1]
        got, expected = _recolour(img, params), _recolour_step_by_step(img, params)
        assert np.abs(got.astype(int) - expected).max() <= 1  # float32 and one fused product: rounding only
        differing += int(np.count_nonzero(got != expected))
    assert differing <= 1e-3 * 20 * 40 * 30 * 3
