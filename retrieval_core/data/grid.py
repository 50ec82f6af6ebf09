"""Grid Search Network training examples: a query and a grid of candidates, one of them its product.

Each example is a query image and ``cells`` gallery images (3x3 in the paper): one positive (the query's
product, another image or view of it) and ``cells - 1`` negatives from distinct other products, in shuffled
positions. A share of the negatives is hard: same category as the query, another product; they are what makes
the grid informative. When the category has too few other products, the rest come from other categories.

Queries and gallery are index spaces of their own (e.g. distorted consumer views and shop photos). When they
are one pool of images (``same_pool=True``), the positive is another image of the product, never the query
itself. ``split_by_product`` splits images so that no product is on both sides, which keeps validation
products out of every training grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # a generated __eq__ / __hash__ would fail on the arrays
class GridBatch:
    """Grids for a batch of queries.

    Attributes:
        query_idx: ``(n,)`` int64 indices into the queries.
        cells: ``(n, cells)`` int64 indices into the gallery, row-major over the grid.
        positive_pos: ``(n,)`` int64 position of the positive in each row of ``cells``.
        hard: ``(n, cells)`` bool, True for a negative of the query's category.
    """

    query_idx: np.ndarray
    cells: np.ndarray
    positive_pos: np.ndarray
    hard: np.ndarray

    def __len__(self) -> int:
        return len(self.query_idx)


def _codes(*arrays: np.ndarray) -> list[np.ndarray]:
    """Labels of any type -> int64 codes shared across the arrays."""
    _, inverse = np.unique(np.concatenate([np.asarray(a) for a in arrays]), return_inverse=True)
    inverse = inverse.astype(np.int64)
    out, start = [], 0
    for a in arrays:
        out.append(inverse[start : start + len(a)])
        start += len(a)
    return out


class GridSampler:
    """Draws GSN grids; the indexes over the gallery are built once, so sampling an epoch is cheap.

    Args:
        query_products: ``(Q,)`` product of each query image (any labels comparable with the gallery's).
        query_categories: ``(Q,)`` category of each query image.
        gallery_products: ``(G,)`` product of each gallery image.
        gallery_categories: ``(G,)`` category of each gallery image; one category per product.
        hard_fraction: share of the negatives taken from the query's category, rounded to a count.
        cells: grid size; 9 for the paper's 3x3.
        same_pool: queries and gallery are the same images (``Q == G``, same products): a query's own
            image is never its positive.

    Raises:
        ValueError: mismatched lengths; ``hard_fraction`` outside [0, 1]; ``cells < 2``; a product with two
            categories in the gallery; a query product with no positive image in the gallery; a query whose
            category is not its product's gallery category; fewer than ``cells - 1`` other products in the
            gallery.
    """

    def __init__(
        self,
        query_products: np.ndarray,
        query_categories: np.ndarray,
        gallery_products: np.ndarray,
        gallery_categories: np.ndarray,
        hard_fraction: float = 0.5,
        cells: int = 9,
        same_pool: bool = False,
    ) -> None:
        if len(query_products) != len(query_categories) or len(gallery_products) != len(gallery_categories):
            raise ValueError("each products array must have the length of its categories array")
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
        if cells < 2:
            raise ValueError(f"cells must be >= 2 (a positive and a negative), got {cells}")
        if same_pool and not np.array_equal(np.asarray(query_products), np.asarray(gallery_products)):
            raise ValueError("same_pool needs the same products, in the same order, on both sides")
        self.cells = cells
        self.same_pool = same_pool
        self.n_hard = round(hard_fraction * (cells - 1))
        q_prod, g_prod = _codes(query_products, gallery_products)
        q_cat, g_cat = _codes(query_categories, gallery_categories)
        self.query_products, self.query_categories = q_prod, q_cat

        products, first = np.unique(g_prod, return_index=True)
        self.products = products  # gallery product codes, sorted
        self.product_category = g_cat[first]
        position = np.searchsorted(products, g_prod)
        if not np.array_equal(self.product_category[position], g_cat):
            raise ValueError("a gallery product has images in two categories; hard negatives need one per product")
        order = np.argsort(position, kind="stable")
        bounds = np.searchsorted(position[order], np.arange(len(products) + 1))
        self.images = [order[bounds[k] : bounds[k + 1]] for k in range(len(products))]  # gallery idx per product

        if len(products) - 1 < cells - 1:
            raise ValueError(f"a grid of {cells} needs {cells - 1} other products; the gallery has {len(products) - 1}")
        counts = np.array([len(i) for i in self.images], dtype=np.int64)
        k = np.searchsorted(products, q_prod).clip(max=len(products) - 1)
        missing = (products[k] != q_prod) | (counts[k] < (2 if same_pool else 1))
        if missing.any():
            raise ValueError(
                f"{int(missing.sum())} queries have no positive in the gallery"
                + (" other than themselves" if same_pool else "")
                + f", e.g. query {int(np.flatnonzero(missing)[0])}"
            )
        mismatch = self.product_category[k] != q_cat
        if mismatch.any():  # the hard negatives (and the hard count) would come from the wrong category
            first = int(np.flatnonzero(mismatch)[0])
            raise ValueError(
                f"{int(mismatch.sum())} queries have another category than their product in the gallery, e.g. query "
                f"{first}: category {np.asarray(query_categories)[first]!r}, its product's "
                f"{np.asarray(gallery_categories)[self.images[k[first]][0]]!r}"
            )
        self.query_position = k  # the query's product, as a position in self.products
        # Positions of the products in each category, and of those outside it.
        self.in_category = {int(c): np.flatnonzero(self.product_category == c) for c in np.unique(g_cat)}
        self._outside: dict[int, np.ndarray] = {}

    def _outside_category(self, c: int) -> np.ndarray:
        if c not in self._outside:
            self._outside[c] = np.flatnonzero(self.product_category != c)
        return self._outside[c]

    def sample(self, rng: np.random.Generator, queries: np.ndarray | None = None) -> GridBatch:
        """One grid per query.

        Args:
            rng: the generator every choice is drawn from.
            queries: query indices, in the order wanted; ``None``: every query in order.

        Returns:
            The grids; ``hard`` marks the negatives of the query's category.

        Raises:
            ValueError: a query index out of range.
        """
        queries = np.arange(len(self.query_products)) if queries is None else np.asarray(queries, dtype=np.int64)
        if queries.size and (queries.min() < 0 or queries.max() >= len(self.query_products)):
            raise ValueError(f"query indices must be in [0, {len(self.query_products)})")
        n, negatives = len(queries), self.cells - 1
        cells = np.empty((n, self.cells), dtype=np.int64)
        hard = np.zeros((n, self.cells), dtype=bool)
        positive_pos = rng.integers(self.cells, size=n)
        for row, q in enumerate(queries):
            p = self.query_position[q]
            category = int(self.query_categories[q])
            same = self.in_category.get(category, np.empty(0, dtype=np.int64))
            hard_products = _draw_excluding(rng, same, min(self.n_hard, len(same) - np.count_nonzero(same == p)), p)
            outside = self._outside_category(category)
            easy = _draw_excluding(rng, outside, min(negatives - len(hard_products), len(outside)), p)
            if len(hard_products) + len(easy) < negatives:  # too few products outside the category: top up
                rest = np.setdiff1d(same, np.append(hard_products, p), assume_unique=False)
                top_up = rng.choice(rest, size=negatives - len(hard_products) - len(easy), replace=False)
                hard_products = np.concatenate([hard_products, top_up])
            chosen = np.concatenate([hard_products, easy]).astype(np.int64)
            rng.shuffle(chosen)
            negative_images = [self.images[k][rng.integers(len(self.images[k]))] for k in chosen]
            positives = self.images[p]
            if self.same_pool:
                positives = positives[positives != q]
            positive = positives[rng.integers(len(positives))]
            cells[row] = np.insert(np.asarray(negative_images, dtype=np.int64), positive_pos[row], positive)
            hard[row] = np.insert(self.product_category[chosen] == category, positive_pos[row], False)
        return GridBatch(query_idx=queries, cells=cells, positive_pos=positive_pos.astype(np.int64), hard=hard)


def _draw_excluding(rng: np.random.Generator, pool: np.ndarray, size: int, excluded: int) -> np.ndarray:
    """``size`` distinct members of ``pool`` other than ``excluded``: one extra drawn, the excluded dropped."""
    if size <= 0:
        return np.empty(0, dtype=np.int64)
    draw = rng.choice(pool, size=min(size + 1, len(pool)), replace=False)
    return draw[draw != excluded][:size]


def sample_grid(
    query_products: np.ndarray,
    query_categories: np.ndarray,
    gallery_products: np.ndarray,
    gallery_categories: np.ndarray,
    rng: np.random.Generator,
    hard_fraction: float = 0.5,
    cells: int = 9,
    same_pool: bool = False,
) -> GridBatch:
    """One grid per query; ``GridSampler(...).sample(rng)`` without keeping the sampler. See ``GridSampler``."""
    sampler = GridSampler(
        query_products, query_categories, gallery_products, gallery_categories, hard_fraction, cells, same_pool
    )
    return sampler.sample(rng)


def split_by_product(products: np.ndarray, validation_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Split images into train and validation by product: every image of a product lands on one side.

    Args:
        products: ``(N,)`` product of each image.
        validation_fraction: share of the distinct products held out, rounded, at least one on each side.
        seed: seed of the ``numpy.random.default_rng`` that picks the held-out products.

    Returns:
        ``(train_idx, validation_idx)``: sorted int64 image indices.

    Raises:
        ValueError: ``validation_fraction`` outside (0, 1), or fewer than two products.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    unique, inverse = np.unique(np.asarray(products), return_inverse=True)
    if len(unique) < 2:
        raise ValueError(f"need at least two products to split, got {len(unique)}")
    n_val = min(max(round(validation_fraction * len(unique)), 1), len(unique) - 1)
    held_out = np.zeros(len(unique), dtype=bool)
    held_out[np.random.default_rng(seed).choice(len(unique), size=n_val, replace=False)] = True
    is_val = held_out[inverse.ravel()]
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)
