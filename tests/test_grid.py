"""The GSN grid sampler against direct checks on the labels, and the product split that keeps validation out."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_core.data.grid import GridSampler, sample_grid, split_by_product


def catalog(n_products: int = 60, images_per_product: int = 2, n_categories: int = 4, seed: int = 0):
    """Gallery labels: ``images_per_product`` images of each product; product ``k`` is of category ``k % C``."""
    products = np.repeat(np.arange(n_products), images_per_product)
    categories = products % n_categories
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(products))  # no useful order for the sampler to lean on
    return products[order], categories[order]


def queries_of(products: np.ndarray, categories: np.ndarray):
    """One query per product (a consumer view of it), with string labels to check any label type works."""
    unique = np.unique(products)
    cats = np.array([categories[products == p][0] for p in unique])
    return np.array([f"p{p}" for p in unique]), np.array([f"c{c}" for c in cats])


def gallery_strings(products, categories):
    return np.array([f"p{p}" for p in products]), np.array([f"c{c}" for c in categories])


def test_exactly_one_positive_and_no_negative_of_the_query_s_product():
    gp, gc = catalog()
    qp, qc = queries_of(gp, gc)
    gps, gcs = gallery_strings(gp, gc)
    batch = sample_grid(qp, qc, gps, gcs, np.random.default_rng(0))
    assert batch.cells.shape == (len(qp), 9) and len(batch) == len(qp)
    for row in range(len(batch)):
        q = batch.query_idx[row]
        same = [gps[g] == qp[q] for g in batch.cells[row]]
        assert sum(same) == 1
        assert same[batch.positive_pos[row]]
        assert len({gps[g] for g in batch.cells[row]}) == 9  # nine distinct products


def test_positions_are_roughly_uniform():
    gp, gc = catalog()
    qp, qc = queries_of(gp, gc)
    sampler = GridSampler(qp, qc, *gallery_strings(gp, gc))
    rng = np.random.default_rng(1)
    positions = np.concatenate([sampler.sample(rng).positive_pos for _ in range(30)])  # 1800 grids
    counts = np.bincount(positions, minlength=9)
    expected = len(positions) / 9
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 26.1  # the 0.999 quantile of chi-square with 8 degrees of freedom


@pytest.mark.parametrize(("hard_fraction", "n_hard"), [(0.0, 0), (0.5, 4), (0.25, 2), (1.0, 8)])
def test_hard_negative_fraction_is_honoured(hard_fraction, n_hard):
    gp, gc = catalog(n_products=80, n_categories=4)  # 20 products a category: enough for every fraction
    qp, qc = queries_of(gp, gc)
    gps, gcs = gallery_strings(gp, gc)
    batch = sample_grid(qp, qc, gps, gcs, np.random.default_rng(2), hard_fraction=hard_fraction)
    for row in range(len(batch)):
        q = batch.query_idx[row]
        same_category = np.array([gcs[g] == qc[q] and gps[g] != qp[q] for g in batch.cells[row]])
        assert same_category.sum() == n_hard
        assert np.array_equal(same_category, batch.hard[row])


def test_a_small_category_falls_back_to_other_categories():
    # Category 0 has 3 products (2 other than the query's); the rest are in category 1.
    products = np.arange(20)
    categories = np.where(products < 3, 0, 1)
    batch = sample_grid(products, categories, products, categories, np.random.default_rng(3), hard_fraction=0.75)
    for row in range(3):  # queries of category 0
        assert batch.hard[row].sum() == 2
        assert len(set(batch.cells[row].tolist())) == 9
    for row in range(3, 20):
        assert batch.hard[row].sum() == 6


def test_too_few_products_outside_the_category_are_topped_up_from_it():
    # Category 0 has 15 products, category 1 has 2: with no hard share, a category-0 query still needs 8.
    products = np.arange(17)
    categories = np.where(products < 15, 0, 1)
    batch = sample_grid(products, categories, products, categories, np.random.default_rng(4), hard_fraction=0.0)
    for row in range(15):
        assert batch.hard[row].sum() == 6
        assert np.isin([15, 16], batch.cells[row]).all()
        assert len(set(batch.cells[row].tolist())) == 9


def test_same_seed_same_grids_other_seed_other_grids():
    gp, gc = catalog()
    qp, qc = queries_of(gp, gc)
    sampler = GridSampler(qp, qc, *gallery_strings(gp, gc))
    a, b = sampler.sample(np.random.default_rng(7)), sampler.sample(np.random.default_rng(7))
    c = sampler.sample(np.random.default_rng(8))
    assert np.array_equal(a.cells, b.cells) and np.array_equal(a.positive_pos, b.positive_pos)
    assert not np.array_equal(a.cells, c.cells)


def test_a_chosen_subset_of_queries_in_the_given_order():
    gp, gc = catalog()
    qp, qc = queries_of(gp, gc)
    batch = GridSampler(qp, qc, *gallery_strings(gp, gc)).sample(np.random.default_rng(0), queries=[5, 2, 5])
    assert batch.query_idx.tolist() == [5, 2, 5] and batch.cells.shape == (3, 9)
    with pytest.raises(ValueError, match="query indices"):
        GridSampler(qp, qc, *gallery_strings(gp, gc)).sample(np.random.default_rng(0), queries=[len(qp)])


def test_same_pool_never_uses_the_query_image_as_its_positive():
    gp, gc = catalog(n_products=20, images_per_product=2)
    sampler = GridSampler(gp, gc, gp, gc, same_pool=True)
    rng = np.random.default_rng(5)
    for _ in range(10):
        batch = sampler.sample(rng)
        positives = batch.cells[np.arange(len(batch)), batch.positive_pos]
        assert not np.any(positives == batch.query_idx)
        assert np.array_equal(gp[positives], gp[batch.query_idx])


def test_refuses_impossible_grids():
    gp, gc = catalog(n_products=20)
    with pytest.raises(ValueError, match="no positive"):
        sample_grid(np.array([99]), np.array([0]), gp, gc, np.random.default_rng(0))
    single = np.arange(20)
    with pytest.raises(ValueError, match="other than themselves"):
        GridSampler(single, single % 3, single, single % 3, same_pool=True)
    with pytest.raises(ValueError, match="needs 8 other products"):
        sample_grid(np.arange(8), np.zeros(8), np.arange(8), np.zeros(8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="two categories"):
        sample_grid(np.arange(3), np.zeros(3), np.array([0, 0, 1, 2]), np.array([0, 1, 0, 0]), None, cells=2)
    with pytest.raises(ValueError, match="hard_fraction"):
        GridSampler(gp, gc, gp, gc, hard_fraction=1.5)


def test_refuses_a_query_whose_category_is_not_its_product_s():
    gp, gc = catalog(n_products=20)
    qp, qc = queries_of(gp, gc)
    gps, gcs = gallery_strings(gp, gc)
    GridSampler(qp, qc, gps, gcs)  # consistent labels are accepted
    wrong = qc.copy()
    wrong[7] = "c3" if qc[7] != "c3" else "c2"  # one query labelled with another category than its product's
    message = r"1 queries have another category than their product in the gallery, e.g. query 7"
    with pytest.raises(ValueError, match=message):
        GridSampler(qp, wrong, gps, gcs)
    with pytest.raises(ValueError, match="another category"):  # a category the gallery does not have at all
        GridSampler(qp, np.where(np.arange(len(qc)) == 0, "c9", qc), gps, gcs)


def test_nine_products_is_enough():
    products = np.arange(9)
    batch = sample_grid(products, products % 2, products, products % 2, np.random.default_rng(0))
    assert all(sorted(row.tolist()) == list(range(9)) for row in batch.cells)


def test_split_by_product_keeps_every_product_on_one_side():
    products = np.repeat(np.arange(50), 3)
    train, val = split_by_product(products, validation_fraction=0.2, seed=0)
    assert len(np.unique(products[val])) == 10
    assert not set(products[train]) & set(products[val])
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(products)))
    again = split_by_product(products, validation_fraction=0.2, seed=0)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(split_by_product(products, validation_fraction=0.2, seed=1)[1], val)


def test_no_validation_product_or_image_reaches_a_training_grid():
    # A pool of images, two per product, each both a query (after distortion) and a gallery image.
    products, categories = catalog(n_products=60, images_per_product=2, n_categories=3)
    train, val = split_by_product(products, validation_fraction=0.25, seed=0)
    sampler = GridSampler(
        products[train], categories[train], products[train], categories[train], hard_fraction=0.5, same_pool=True
    )
    rng = np.random.default_rng(0)
    val_products, val_images = set(products[val].tolist()), set(val.tolist())
    for _ in range(20):
        batch = sampler.sample(rng)
        images = np.concatenate([train[batch.query_idx], train[batch.cells.ravel()]])  # back to pool indices
        assert not set(images.tolist()) & val_images
        assert not set(products[images].tolist()) & val_products
