"""The product-retrieval protocols: what a query/grid model trains on and what it is evaluated on.

Two protocols, each decoded once into a :class:`ProductRetrievalData` (pixels through the pipeline's own
decoder and preprocessing, cached by ``real_photos.decode_files``):

``synthetic`` (:func:`load_synthetic`)
    Training: a synthetic catalog generated with its own seed (the baseline bundle's training catalog, seed 1),
    so no evaluated product is ever trained on. Queries = its consumer views, gallery = its shop views, the
    positive of a query = the shop view of its product. Evaluation: the default catalog (seed 0, the one
    ``make index`` indexes): queries = its consumer views, gallery = its shop views, hit = same product.

``clothing-small`` (:func:`load_clothing_small`)
    Training: ``train/`` photos only. A query is a distorted view of a train photo, made afresh every epoch
    (:func:`consumer_view` with key ``f"train:{id}:{epoch}"``, :meth:`ProductRetrievalData.train_query_views`);
    its positive is the original photo, the negatives other train photos. Evaluation: gallery = every photo,
    train and validation, undistorted; queries = one distorted view of each ``validation/`` photo, with keys
    of their own (``f"eval:{id}"``, seed :data:`EVAL_DISTORTION_SEED`), so no evaluation view is ever a
    training view; hit = the original photo. Each photo is its own product; its class is its category.

    Views (:func:`consumer_view`) are made at the recipe's working resolution, not at the model's input size:
    the photo decoded once at its own aspect ratio with its longer side
    :data:`~retrieval_core.data.distortions.WORKING_LONG_SIDE` (256) pixels (cached), distorted there, then
    resized and letterboxed to the model's input like any photo. So the evaluation queries are the same views
    whatever the image size, JPEG blocks and occluders have a phone photo's scale, and the letterbox bars are
    added after the distortion, white as in the gallery, never tinted or moved (a cue only queries would have).

    Consumer-to-shop at category level (:class:`ShopProtocol`, optional): queries = the undistorted
    ``validation/`` photos, gallery = every fashion-product-small shop photo, relevant = a shop item whose
    ``articleType`` maps to the query's class (:mod:`retrieval_core.data.consumer_shop`). Queries of a class
    with no counterpart are left out and listed.

Photo galleries are ordered by a hash of the item id: rankings break ties by gallery position, and the
folder order (class by class) or the shop id order (catalogue batches) would favour whole classes.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from retrieval_core.data import real_photos
from retrieval_core.data.consumer_shop import shop_article_types
from retrieval_core.data.distortions import WORKING_LONG_SIDE, distort
from retrieval_core.data.synthetic import CATEGORIES, SyntheticConfig, generate_catalog
from retrieval_core.preprocess import Preprocessing, resize_for_model

EVAL_DISTORTION_SEED = 0
"""Seed of the evaluation views: fixed, so that runs of every training seed meet the same queries."""
# The synthetic catalogs: the baseline bundle's training catalog, and the one ``make index`` indexes.
SYNTHETIC_TRAIN = SyntheticConfig(products_per_category=120, consumer_views=3, seed=1)
SYNTHETIC_EVAL = SyntheticConfig(products_per_category=100, consumer_views=2, seed=0)
PROTOCOLS = {
    "synthetic": "consumer-vs-shop-same-product",
    "clothing-small": "distorted-validation-vs-all-photos-same-photo",
}
SHOP_PROTOCOL = "validation-consumer-vs-shop-same-garment-type"


def train_view_key(item_id: str, epoch: int) -> str:
    """Distortion key of the training view of a photo in one epoch."""
    return f"train:{item_id}:{epoch}"


def eval_view_key(item_id: str) -> str:
    """Distortion key of the evaluation view of a photo; disjoint from every training key."""
    return f"eval:{item_id}"


def consumer_view(photo: np.ndarray, key: str, seed: int, prep: Preprocessing) -> np.ndarray:
    """A consumer view of a photo as a model sees it: ``(S, S, 3)`` uint8.

    Args:
        photo: ``(h, w, 3)`` uint8 at the working resolution (longer side
            :data:`~retrieval_core.data.distortions.WORKING_LONG_SIDE`, its own aspect ratio).
        key: the view's distortion key (:func:`train_view_key`, :func:`eval_view_key`).
        seed: the distortion seed.
        prep: the model's preprocessing: the distorted view is resized (and letterboxed) to its input size.
    """
    view = distort(photo, key, seed)
    return np.asarray(resize_for_model(Image.fromarray(view), prep), dtype=np.uint8)


@dataclass(frozen=True, eq=False)  # a generated __eq__ / __hash__ would fail on the arrays
class ShopProtocol:
    """Consumer-to-shop at category level: consumer photos against shop photos of the same garment type.

    Attributes:
        query_pixels: ``(Q, S, S, 3)`` uint8, undistorted consumer photos.
        query_labels: ``(Q,)`` int64 class of each query (index into the data's ``classes``).
        query_eval_index: ``(Q,)`` int64 position of the same photo among the evaluation queries.
        gallery_pixels: ``(G, S, S, 3)`` uint8 shop photos.
        gallery_labels: ``(G,)`` int64 consumer class of each shop photo, -1 for article types of no class.
        gallery_ids: the shop ids, in gallery order.
        left_out_classes: consumer classes with no shop counterpart; their queries are not in ``query_*``.
    """

    query_pixels: np.ndarray
    query_labels: np.ndarray
    query_eval_index: np.ndarray
    gallery_pixels: np.ndarray
    gallery_labels: np.ndarray
    gallery_ids: tuple[str, ...]
    left_out_classes: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class ProductRetrievalData:
    """Decoded images of one protocol: the training grids' queries and gallery, and the evaluation split.

    Products are int64 codes shared by every array of the object; categories index ``classes``.

    Attributes:
        dataset: ``synthetic`` or ``clothing-small``.
        protocol: the evaluation protocol's name.
        prep: the preprocessing every image went through (the bundle's).
        classes: category names.
        train_gallery: ``(G, S, S, 3)`` uint8, the training grids' cells.
        train_gallery_products, train_gallery_categories: ``(G,)`` int64.
        train_query_products, train_query_categories: ``(Q,)`` int64.
        train_queries: ``(Q, S, S, 3)`` uint8 fixed query views, or None: queries are distorted views of
            ``train_photos[train_query_source]`` made afresh every epoch.
        train_query_source: ``(Q,)`` int64 (distorted queries only) the gallery photo each query views.
        train_query_ids: the id of each training query's photo (the distortion key) or view.
        eval_queries: ``(E, S, S, 3)`` uint8.
        eval_query_products, eval_query_categories: ``(E,)`` int64.
        eval_query_ids: ids of the evaluation queries.
        eval_gallery: ``(H, S, S, 3)`` uint8.
        eval_gallery_products, eval_gallery_categories: ``(H,)`` int64.
        eval_gallery_ids: ids of the gallery items.
        shop: the consumer-to-shop protocol, or None.
        notes: facts to record with a run (sources, undecodable files).
        train_photos: (distorted queries only) the photos of ``train_gallery`` at the working resolution, one
            ``(h, w, 3)`` uint8 array each, in the same order: what the training views are made from.
    """

    dataset: str
    protocol: str
    prep: Preprocessing
    classes: tuple[str, ...]
    train_gallery: np.ndarray
    train_gallery_products: np.ndarray
    train_gallery_categories: np.ndarray
    train_query_products: np.ndarray
    train_query_categories: np.ndarray
    train_queries: np.ndarray | None
    train_query_source: np.ndarray | None
    train_query_ids: tuple[str, ...]
    eval_queries: np.ndarray
    eval_query_products: np.ndarray
    eval_query_categories: np.ndarray
    eval_query_ids: tuple[str, ...]
    eval_gallery: np.ndarray
    eval_gallery_products: np.ndarray
    eval_gallery_categories: np.ndarray
    eval_gallery_ids: tuple[str, ...]
    shop: ShopProtocol | None = None
    notes: dict = field(default_factory=dict)
    train_photos: Sequence[np.ndarray] | None = None

    def __post_init__(self) -> None:
        if (self.train_queries is None) == (self.train_query_source is None):
            raise ValueError("give either fixed train_queries or train_query_source (distorted views), not both")
        if (self.train_query_source is None) != (self.train_photos is None):
            raise ValueError("distorted training views (train_query_source) need train_photos, and only they do")
        if self.train_photos is not None and len(self.train_photos) != len(self.train_gallery):
            raise ValueError(f"{len(self.train_photos)} training photos for {len(self.train_gallery)} gallery images")
        n = len(self.train_query_products)
        if len(self.train_query_categories) != n or len(self.train_query_ids) != n:
            raise ValueError("every training-query array must have one entry per query")
        if self.train_queries is not None and len(self.train_queries) != n:
            raise ValueError(f"{len(self.train_queries)} training query images for {n} queries")
        if self.train_query_source is not None and len(self.train_query_source) != n:
            raise ValueError(f"{len(self.train_query_source)} training query sources for {n} queries")
        if len(self.eval_queries) != len(self.eval_query_products) or len(self.eval_gallery) != len(
            self.eval_gallery_products
        ):
            raise ValueError("every evaluation image needs a product")

    @property
    def distorted_queries(self) -> bool:
        """True when training queries are distorted gallery photos, made afresh every epoch."""
        return self.train_query_source is not None

    def train_query_views(self, idx: np.ndarray, epoch: int, seed: int) -> np.ndarray:
        """The training queries ``idx`` as the model sees them in ``epoch``: ``(n, S, S, 3)`` uint8.

        Fixed views are returned as stored; distorted ones are ``consumer_view(photo, train_view_key(id,
        epoch), seed, prep)`` of the working-resolution photo, a pure function of (seed, id, epoch), so a resumed
        run replays them.
        """
        idx = np.asarray(idx, dtype=np.int64)
        if self.train_queries is not None:
            return self.train_queries[idx]
        out = np.empty((len(idx), *self.train_gallery.shape[1:]), dtype=np.uint8)
        for row, q in enumerate(idx):
            photo = self.train_photos[self.train_query_source[q]]
            out[row] = consumer_view(photo, train_view_key(self.train_query_ids[q], epoch), seed, self.prep)
        return out


def id_hash_order(ids: Sequence[str]) -> np.ndarray:
    """Positions of ``ids`` sorted by the sha256 of each id: a fixed order unrelated to class or source."""
    keys = [hashlib.sha256(i.encode()).hexdigest() for i in ids]
    return np.argsort(keys, kind="stable").astype(np.int64)


# ------------------------------------------------------------------------------------------------ synthetic


def _read_catalog(catalog_csv: str) -> list[dict]:
    with open(catalog_csv, newline="") as f:
        return list(csv.DictReader(f))


def load_synthetic(
    train_catalog: str, eval_catalog: str, prep: Preprocessing, cache_dir: str | None = None
) -> ProductRetrievalData:
    """Generate (or reuse) the two synthetic catalogs and decode them; see the module docstring.

    Args:
        train_catalog: folder of the training catalog (:data:`SYNTHETIC_TRAIN`).
        eval_catalog: folder of the evaluated catalog (:data:`SYNTHETIC_EVAL`, the default indexed one).
        prep: preprocessing of every image.
        cache_dir: decode cache folder; None: no cache.
    """
    parts, failed = {}, 0
    for name, folder, config in (("train", train_catalog, SYNTHETIC_TRAIN), ("eval", eval_catalog, SYNTHETIC_EVAL)):
        catalog = generate_catalog(folder, config, progress=True)
        rows = _read_catalog(str(catalog))
        base = os.path.dirname(os.path.abspath(catalog))
        pixels, ok = real_photos.decode_files(
            [os.path.join(base, r["image_uri"]) for r in rows], prep, cache_dir, desc=f"decode synthetic {name}"
        )
        failed += int((~ok).sum())
        rows = [r for r, good in zip(rows, ok) if good]
        parts[name] = (rows, pixels)

    codes: dict[tuple[str, str], int] = {}  # (catalog, product_id) -> product code: the catalogs are disjoint

    def split(name: str, view: str):
        rows, pixels = parts[name]
        keep = np.array([r["view"] == view for r in rows], dtype=bool)
        chosen = [r for r, k in zip(rows, keep) if k]
        products = np.array([codes.setdefault((name, r["product_id"]), len(codes)) for r in chosen], dtype=np.int64)
        categories = np.array([CATEGORIES.index(r["category"]) for r in chosen], dtype=np.int64)
        return pixels[keep], products, categories, tuple(r["item_id"] for r in chosen)

    tg, tg_prod, tg_cat, _ = split("train", "shop")
    tq, tq_prod, tq_cat, tq_ids = split("train", "consumer")
    eg, eg_prod, eg_cat, eg_ids = split("eval", "shop")
    eq, eq_prod, eq_cat, eq_ids = split("eval", "consumer")
    return ProductRetrievalData(
        dataset="synthetic",
        protocol=PROTOCOLS["synthetic"],
        prep=prep,
        classes=CATEGORIES,
        train_gallery=tg,
        train_gallery_products=tg_prod,
        train_gallery_categories=tg_cat,
        train_query_products=tq_prod,
        train_query_categories=tq_cat,
        train_queries=tq,
        train_query_source=None,
        train_query_ids=tq_ids,
        eval_queries=eq,
        eval_query_products=eq_prod,
        eval_query_categories=eq_cat,
        eval_query_ids=eq_ids,
        eval_gallery=eg,
        eval_gallery_products=eg_prod,
        eval_gallery_categories=eg_cat,
        eval_gallery_ids=eg_ids,
        notes={
            "train_catalog": {"path": train_catalog, **asdict(SYNTHETIC_TRAIN)},
            "eval_catalog": {"path": eval_catalog, **asdict(SYNTHETIC_EVAL)},
            "undecodable_images": failed,
        },
    )


# ------------------------------------------------------------------------------------------- clothing-small


def _decode(files: real_photos.LabelledFiles, prep: Preprocessing, cache_dir: str | None, desc: str):
    """(pixels, labels, ids, number undecodable) of the files that decode, in listing order."""
    pixels, ok = real_photos.decode_files(files.paths, prep, cache_dir, desc=desc)
    ids = tuple(i for i, good in zip(files.ids, ok) if good)
    return pixels, files.labels[ok], ids, int((~ok).sum())


def _decode_photos(files: real_photos.LabelledFiles, prep: Preprocessing, cache_dir: str | None, desc: str):
    """(pixels, working-resolution photos, labels, ids, number undecodable) of the files that decode, in listing
    order: the model-size pixels (the pipeline's decode) and the photos the distortions start from."""
    pixels, ok = real_photos.decode_files(files.paths, prep, cache_dir, desc=desc)
    photos, ok_photos = real_photos.decode_photos_long_side(
        files.paths, WORKING_LONG_SIDE, cache_dir, desc=f"{desc} at {WORKING_LONG_SIDE} px"
    )
    both = ok & ok_photos  # the same decoder: in practice the same files
    pixels = pixels[both[ok]]
    photos = [p for p, keep in zip(photos, both[ok_photos]) if keep]
    ids = tuple(i for i, good in zip(files.ids, both) if good)
    return pixels, photos, files.labels[both], ids, int((~both).sum())


def load_shop_protocol(
    classes: tuple[str, ...],
    val_pixels: np.ndarray,
    val_labels: np.ndarray,
    prep: Preprocessing,
    shop_dir: str | None = None,
    cache_dir: str | None = None,
) -> tuple[ShopProtocol, int]:
    """The consumer-to-shop protocol for the validation photos; returns it and the number of undecodable shop files.

    Args:
        classes: the consumer class names (clothing-small's vocabulary).
        val_pixels: ``(V, S, S, 3)`` the undistorted validation photos, in evaluation-query order.
        val_labels: ``(V,)`` their classes.
        prep: preprocessing (the same as the consumer photos').
        shop_dir: the fashion-product-small folder; None: under ``RETRIEVAL_DATA_DIR``.
        cache_dir: decode cache folder.
    """
    types = shop_article_types()
    queries, shop = real_photos.fashion_product_split(seed=0, label="articleType", data_dir=shop_dir)
    # Every kept shop photo: the split's two sides together, in id-hash order.
    paths = queries.paths + shop.paths
    ids = queries.ids + shop.ids
    labels = np.concatenate([queries.labels, shop.labels])
    order = id_hash_order(ids)
    files = real_photos.LabelledFiles(
        tuple(paths[i] for i in order), labels[order], shop.classes, tuple(ids[i] for i in order)
    )
    pixels, article, shop_ids, failed = _decode(files, prep, cache_dir, "decode fashion-product-small shop photos")
    class_of = types.class_of()
    consumer_index = {c: k for k, c in enumerate(classes)}
    gallery_labels = np.array(
        [consumer_index.get(class_of.get(files.classes[a], ""), -1) for a in article], dtype=np.int64
    )
    left_out = tuple(c for c in classes if c in types.unmapped or c not in types.article_types)
    keep = np.flatnonzero(~np.isin(val_labels, [consumer_index[c] for c in left_out]))
    protocol = ShopProtocol(
        query_pixels=val_pixels[keep],
        query_labels=np.asarray(val_labels, dtype=np.int64)[keep],
        query_eval_index=keep.astype(np.int64),
        gallery_pixels=pixels,
        gallery_labels=gallery_labels,
        gallery_ids=shop_ids,
        left_out_classes=left_out,
    )
    return protocol, failed


def load_clothing_small(
    prep: Preprocessing,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    shop_dir: str | None = None,
    with_shop: bool = True,
) -> ProductRetrievalData:
    """Decode clothing-small (and the shop photos) into the protocol of the module docstring.

    Args:
        prep: preprocessing of every photo.
        data_dir: the clothing-small folder; None: under ``RETRIEVAL_DATA_DIR``.
        cache_dir: decode cache folder; None: no cache.
        shop_dir: the fashion-product-small folder; None: under ``RETRIEVAL_DATA_DIR``.
        with_shop: also load the consumer-to-shop protocol (decodes every shop photo once, then cached).
    """
    train_files = real_photos.clothing_small("train", data_dir)
    val_files = real_photos.clothing_small("validation", data_dir)
    train, train_photos, train_labels, train_ids, train_failed = _decode_photos(
        train_files, prep, cache_dir, "decode clothing-small train"
    )
    val, val_photos, val_labels, val_ids, val_failed = _decode_photos(
        val_files, prep, cache_dir, "decode clothing-small validation"
    )
    overlap = set(train_ids) & set(val_ids)
    if overlap:
        raise ValueError(f"clothing-small: {len(overlap)} photo ids are in both train/ and validation/")
    n_train = len(train_ids)
    # Every photo is its own product: train photos are 0..n_train-1, validation photos follow.
    train_products = np.arange(n_train, dtype=np.int64)
    val_products = np.arange(n_train, n_train + len(val_ids), dtype=np.int64)
    queries = np.stack(
        [consumer_view(p, eval_view_key(i), EVAL_DISTORTION_SEED, prep) for p, i in zip(val_photos, val_ids)]
    )
    del val_photos  # only the views are kept

    all_ids = train_ids + val_ids
    order = id_hash_order(all_ids)
    gallery = np.concatenate([train, val])[order]
    shop, shop_failed = None, 0
    if with_shop:
        shop, shop_failed = load_shop_protocol(train_files.classes, val, val_labels, prep, shop_dir, cache_dir)
    return ProductRetrievalData(
        dataset="clothing-small",
        protocol=PROTOCOLS["clothing-small"],
        prep=prep,
        classes=tuple(train_files.classes),
        train_gallery=train,
        train_gallery_products=train_products,
        train_gallery_categories=np.asarray(train_labels, dtype=np.int64),
        train_query_products=train_products,
        train_query_categories=np.asarray(train_labels, dtype=np.int64),
        train_queries=None,
        train_query_source=np.arange(n_train, dtype=np.int64),
        train_query_ids=train_ids,
        eval_queries=queries,
        eval_query_products=val_products,
        eval_query_categories=np.asarray(val_labels, dtype=np.int64),
        eval_query_ids=val_ids,
        eval_gallery=gallery,
        eval_gallery_products=np.concatenate([train_products, val_products])[order],
        eval_gallery_categories=np.concatenate([train_labels, val_labels]).astype(np.int64)[order],
        eval_gallery_ids=tuple(all_ids[i] for i in order),
        shop=shop,
        train_photos=train_photos,
        notes={
            "eval_distortion_seed": EVAL_DISTORTION_SEED,
            "distortion_long_side": WORKING_LONG_SIDE,
            "undecodable_images": train_failed + val_failed,
            "undecodable_shop_images": shop_failed,
        },
    )
