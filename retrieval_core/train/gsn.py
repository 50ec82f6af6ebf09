"""Train Grid Search Network embeddings (or the triplet baseline on the same grids); evaluate product retrieval.

    python -m retrieval_core.train.gsn --dataset clothing-small --out artifacts/bundles/gsn-clothing-small
    retrieval-train gsn --dataset synthetic --loss triplet --out artifacts/bundles/triplet-synthetic
    retrieval-train gsn --dataset clothing-small --transform_steps 40 --out ...   # + the RL embedding transform

Training as search (METHODS.md section 1): every example is a query image and a 3x3 grid of candidates from the
gallery, one positive (the query's product) and eight negatives, ``hard_fraction`` of them hard (same
category, another product), in shuffled positions (:class:`retrieval_core.data.grid.GridSampler`). One
backbone (the baseline CNN) embeds the query and the cells; the score map is the cosine of the query with
each cell (:func:`retrieval_core.losses.gsn.grid_scores`), and the loss is

- ``gsn``: the paper's per-cell squared hinge (positive up to ``pos_margin`` 0.9, negatives down to
  ``neg_margin`` 0), :class:`~retrieval_core.losses.gsn.GridScoreLoss`;
- ``gsn-softmax``: cross-entropy of picking the positive among the cells (``temperature``);
- ``triplet``: the ablation baseline, ``max(0, margin - s_pos + s_neg)`` averaged over the negatives of the
  SAME grids (:class:`~retrieval_core.losses.gsn.GridTripletLoss`). The grids, batches, augmentation,
  auxiliary terms and schedule are identical for every loss (one seed, one random stream, which the loss never
  draws from), so GSN and triplet differ only in the loss.

Two auxiliary terms, the same for every loss: the category head's cross-entropy on every image of the step
(``w_category``; the bundle's category head feeds the pipeline's category column) and the same grid loss on the
cosine of the hash head's tanh codes (``w_hash``), so the bundle's binary codes are meaningful too.
A step is ``grids_per_batch`` grids: ``grids_per_batch * (1 + cells)`` images through the network (160 with the
defaults). An epoch draws one grid per training query, in a seeded order.

Augmentation (the same for every loss): ``synthetic`` augments queries and cells as the baseline bundle does;
``clothing-small`` queries are the distortion recipe's fresh views (nothing more; made at the recipe's 256-px
working resolution, then resized to ``image_size``: :func:`~retrieval_core.data.product_retrieval.consumer_view`),
and the cells (original photos) get a mild flip / shift / zoom / light jitter.

Data and protocols: :mod:`retrieval_core.data.product_retrieval` (``synthetic``: consumer views against shop
views of a catalog never trained on; ``clothing-small``: distorted validation photos against every photo, hit =
the original, with category-level mAP@100 beside it, and consumer-to-shop at category level against every
fashion-product-small shop photo: mAP@100 and precision@10).

Metrics (:func:`retrieval_core.eval.retrieval.product_retrieval_metrics`, brute-force ranking by the inner
product of the served features, ties to the lower gallery position): ``recall_at_1/10/20`` (R@k: a hit in the
top k), ``map_all`` (one relevant item: the mean reciprocal rank of the hit), ``category_map_at_100``,
``top1_acc`` (category head on the queries), and ``c2s_map_at_100`` / ``c2s_precision_at_10``. Features are
always :func:`~retrieval_core.embedding_transform.serve_embeddings` of the model's embeddings, the function the
encoder serves with. The headline metrics (the names above) are those of the untransformed features on all
held-out queries: what the network gives. A bundle that adopts a transform serves other features, so the bundle
also says what it serves: ``served_*`` are the metrics of the features it serves, on the report half of the
held-out queries when a transform search ran (the queries no choice was made on), else on all held-out queries
(``training["served_metrics"]`` says which, and the transform).

RL embedding transform (``--transform_steps > 0``): the held-out queries are split by product, seeded by
``split_seed``, into a search half and a report half, and the search half again (seed ``split_seed + 1``) into
a select part and a confirm part. The controller of :mod:`retrieval_core.rl.controller` searches
:data:`~retrieval_core.rl.expressions.EMBEDDING_GRAMMAR`; its reward is ``transform_metric`` (``map``: mAP, the
default, as R@1 is coarse on a few hundred queries; or ``r1``) of the select queries against the whole gallery,
on :func:`~retrieval_core.embedding_transform.serve_embeddings` of the model's embeddings, exactly what the
encoder serves; the identity is scored through the same function. The best storable expression on select is
adopted (written into the bundle) only if its features are not the identity's in disguise (``add(x, x)``,
``mul(x, 2)``, ``neg(x)``: equal up to float rounding and sign, so any gain is rounding noise) and it beats the
identity by more than ``transform_min_gain`` both on select and on the confirm queries, which the controller
never scored: the maximum over hundreds of noisy select scores is biased upwards, the confirm score is not.
The report half is scored by neither and is what the benchmark reports: its metrics with
and without the transform are ``report_*`` and ``report_transformed_*`` in the bundle's metrics. Select,
confirm and report numbers are in ``training["transform_search"]``.

Time (2 quiet CPU cores, the default sizes; ``make bench-gsn``'s full run): a step of 160 images at 64 px takes
~0.3 s (~0.6 s on one core while another job runs), so an epoch takes ~55 s for synthetic (2,880 consumer
views: 180 steps) and ~65 s for clothing-small (3,068 queries: 191 steps); the default 5 epochs trained in
270 s and 320-340 s. clothing-small's views
cost ~4 ms each on one core (measured, 300 views at 256 px), ~12 s an epoch more, and the 256-px decode of
the photos ~25 s once (then cached; ~0.45 GB in memory for the train photos). Evaluation adds ~15 s,
consumer-to-shop ~1 to 2.5 min more (embedding ~40k shop photos; decoding them once is ~2.5 min, then cached),
and a transform search ~70 ms a distinct expression (50 steps x 16: under a minute).

The bundle is a normal ``baseline_cnn`` bundle: serving embeds with the query branch, which is the shared
backbone. Seeded (``seed``; per-epoch random streams), resumable (``--resume``: identical weights; a
checkpoint of another configuration is refused; a finished checkpoint goes straight to evaluation and the
transform search, whose settings may differ), tqdm progress.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrieval_core.bundle import BundleConfig, save_bundle
from retrieval_core.data.grid import GridBatch, GridSampler, split_by_product
from retrieval_core.data.product_retrieval import (
    SHOP_PROTOCOL,
    ProductRetrievalData,
    load_clothing_small,
    load_synthetic,
)
from retrieval_core.embedding_transform import EmbeddingTransformError, serve_embeddings
from retrieval_core.embedding_transform import (
    parse_embedding_transform as parse_transform,
)
from retrieval_core.encoder import keep_freed_memory_for_reuse, pack_codes
from retrieval_core.eval.retrieval import (
    category_retrieval_metrics,
    product_retrieval_metrics,
)
from retrieval_core.losses import create_loss
from retrieval_core.losses.gsn import GridTripletLoss, grid_scores
from retrieval_core.models import create_model
from retrieval_core.preprocess import Preprocessing, to_model_input
from retrieval_core.rl.controller import search
from retrieval_core.rl.expressions import EMBEDDING_GRAMMAR, Expr
from retrieval_core.train.common import augment, config_args_parser, config_from_args, resume_or_start

DATASETS = ("synthetic", "clothing-small")
LOSSES = ("gsn", "gsn-softmax", "triplet")
TRANSFORM_METRICS = {"map": "map_all", "r1": "recall_at_1"}
# Settings that do not change the trained weights: a checkpoint may be resumed with other values.
NOT_TRAINING = (
    "out",
    "resume",
    "threads",
    "cache_dir",
    "no_c2s",
    "eval_every",
    "split_seed",
    "transform_steps",
    "transform_batch",
    "transform_lr",
    "transform_seed",
    "transform_metric",
    "transform_min_gain",
)
_MILD = {"max_angle": 0.05, "scale": (0.95, 1.05), "max_shift": 0.05, "brightness": (0.9, 1.1), "max_offset": 0.1}
# Per dataset: augment() settings of the queries and of the cells; None: not augmented.
AUGMENT: dict[str, dict[str, dict | None]] = {
    "synthetic": {"queries": {}, "cells": {}},
    "clothing-small": {"queries": None, "cells": _MILD},
}


@dataclass(frozen=True)
class GSNConfig:
    """Everything that determines a training run; dumped beside the checkpoint.

    ``transform_min_gain`` (default 0.005, in units of the reward: mAP or R@1) is the margin by which a searched
    transform must beat the identity on the confirm queries to be adopted. Half a point of mAP is about one
    confirm query in a hundred moving from rank 2 to rank 1: smaller gains are within the noise of the few
    hundred confirm queries the protocols have (~85 on clothing-small, 400 on synthetic) and are not worth a
    serving change (a new model id, hence a re-index). The select score must beat the identity's by the same
    margin. A value below -1 adopts the best storable expression whatever it scores.
    """

    out: str = "artifacts/bundles/gsn"
    dataset: str = "clothing-small"
    data_dir: str = ""  # holds clothing-small/ and fashion-product-small/; "": $RETRIEVAL_DATA_DIR
    cache_dir: str = "artifacts/cache"  # decoded photos, keyed by file list and preprocessing
    train_catalog: str = "artifacts/train_catalog"  # synthetic: the training catalog (seed 1)
    eval_catalog: str = "artifacts/catalog"  # synthetic: the evaluated catalog (seed 0, what make index indexes)
    image_size: int = 64
    embedding_dim: int = 128
    hash_bits: int = 64
    widths: tuple[int, ...] = (24, 48, 96, 192)
    loss: str = "gsn"
    pos_margin: float = 0.9  # gsn
    neg_margin: float = 0.0  # gsn
    temperature: float = 0.1  # gsn-softmax
    triplet_margin: float = 0.2  # triplet
    hard_fraction: float = 0.5
    cells: int = 9  # a 3x3 grid
    grids_per_batch: int = 16  # 16 x (1 + 9) = 160 images a step
    epochs: int = 5  # ~1 min each on 2 quiet cores at 64 px (make bench-gsn measured 55-65 s): far under 20 min
    lr: float = 3e-3
    weight_decay: float = 5e-4
    w_category: float = 0.1
    w_hash: float = 0.1
    eval_every: int = 0  # > 0: product metrics in the history every this many epochs (the end always)
    no_c2s: bool = False  # clothing-small: skip consumer-to-shop (it decodes and encodes ~40k shop photos)
    transform_steps: int = 0  # RL transform search: controller updates; 0 = off
    transform_batch: int = 16  # expressions sampled per update
    transform_lr: float = 5e-3  # the controller's Adam lr (METHODS.md's 2e-4 barely moves it in 50 steps)
    transform_seed: int = 0
    transform_metric: str = "map"  # the reward: map (mAP) or r1 (R@1) on the search half
    transform_min_gain: float = 0.005  # adopt only if it beats the identity on the confirm queries by more
    split_seed: int = 0  # the search / report split of the held-out queries
    seed: int = 0
    threads: int = 0  # 0: torch's default
    resume: bool = False

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.transform_metric not in TRANSFORM_METRICS:
            raise ValueError(f"--transform_metric must be one of {tuple(TRANSFORM_METRICS)}")
        if self.hash_bits <= 0 or self.hash_bits % 8:
            raise ValueError(f"--hash_bits must be a positive multiple of 8, got {self.hash_bits}")
        if self.epochs < 1 or self.grids_per_batch < 1 or self.cells < 2:
            raise ValueError("need --epochs >= 1, --grids_per_batch >= 1 and --cells >= 2")
        if self.transform_steps < 0 or self.transform_batch < 1:
            raise ValueError("need --transform_steps >= 0 and --transform_batch >= 1")


def load_data(cfg: GSNConfig) -> ProductRetrievalData:
    """Decode the protocol's images (cached under ``cache_dir``)."""
    prep = Preprocessing(image_size=cfg.image_size)
    cache = cfg.cache_dir or None
    if cfg.dataset == "synthetic":
        return load_synthetic(cfg.train_catalog, cfg.eval_catalog, prep, cache)
    folder = (lambda name: os.path.join(cfg.data_dir, name)) if cfg.data_dir else (lambda name: None)
    return load_clothing_small(prep, folder("clothing-small"), cache, folder("fashion-product-small"), not cfg.no_c2s)


# ------------------------------------------------------------------------------------------------- training


@dataclass
class Trainer:
    """The network, its optimiser and schedule, and the grid loss."""

    cfg: GSNConfig
    prep: Preprocessing
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss: torch.nn.Module

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def model_config(cfg: GSNConfig, n_classes: int) -> dict:
    return {
        "embedding_dim": cfg.embedding_dim,
        "hash_bits": cfg.hash_bits,
        "num_categories": n_classes,
        "attribute_classes": {},
        "widths": list(cfg.widths),
    }


def grid_loss(cfg: GSNConfig) -> torch.nn.Module:
    """The loss on the score map that ``cfg.loss`` names."""
    if cfg.loss == "gsn":
        return create_loss("gsn_score", pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin)
    if cfg.loss == "gsn-softmax":
        return create_loss("gsn_softmax", temperature=cfg.temperature)
    return GridTripletLoss(cfg.triplet_margin)


def build_trainer(cfg: GSNConfig, prep: Preprocessing, n_classes: int, steps_per_epoch: int) -> Trainer:
    model = create_model("baseline_cnn", **model_config(cfg, n_classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    return Trainer(cfg, prep, model, optimizer, scheduler, grid_loss(cfg))


@dataclass(frozen=True, eq=False)
class GridStep:
    """The images of one step: ``n`` queries and their grids, as uint8 pixels, before augmentation.

    Attributes:
        queries: ``(n, S, S, 3)``.
        cells: ``(n, C, S, S, 3)``, row-major over each grid.
        positive_pos: ``(n,)`` position of the positive in each grid.
        query_categories: ``(n,)``.
        cell_categories: ``(n, C)``.
    """

    queries: np.ndarray
    cells: np.ndarray
    positive_pos: np.ndarray
    query_categories: np.ndarray
    cell_categories: np.ndarray


def make_step(data: ProductRetrievalData, grids: GridBatch, epoch: int, seed: int) -> GridStep:
    """Gather the pixels of a batch of grids (the queries' views of this epoch and the gallery cells)."""
    return GridStep(
        queries=data.train_query_views(grids.query_idx, epoch, seed),
        cells=data.train_gallery[grids.cells],
        positive_pos=grids.positive_pos,
        query_categories=data.train_query_categories[grids.query_idx],
        cell_categories=data.train_gallery_categories[grids.cells],
    )


def training_step(trainer: Trainer, step: GridStep, gen: torch.Generator) -> dict[str, float]:
    """One optimiser step on a batch of grids; ``gen`` is the augmentation stream (the loss never draws from it)."""
    cfg, prep = trainer.cfg, trainer.prep
    n, cells = step.cells.shape[:2]
    xq = torch.from_numpy(to_model_input(step.queries, prep))
    xc = torch.from_numpy(to_model_input(step.cells.reshape(n * cells, *step.cells.shape[2:]), prep))
    settings = AUGMENT[cfg.dataset]
    if settings["queries"] is not None:
        xq = augment(xq, gen, **settings["queries"])
    if settings["cells"] is not None:
        xc = augment(xc, gen, **settings["cells"])
    out = trainer.model(torch.cat([xq, xc]))
    positive = torch.from_numpy(step.positive_pos)
    scores = grid_scores(out["embedding"][:n], out["embedding"][n:].reshape(n, cells, -1))
    codes = out["hash"]
    categories = torch.from_numpy(np.concatenate([step.query_categories, step.cell_categories.reshape(-1)]))
    terms = {
        "grid": trainer.loss(scores, positive),
        "hash": trainer.loss(grid_scores(codes[:n], codes[n:].reshape(n, cells, -1)), positive),
        "category": F.cross_entropy(out["category"], categories),
    }
    total = terms["grid"] + cfg.w_hash * terms["hash"] + cfg.w_category * terms["category"]
    trainer.optimizer.zero_grad(set_to_none=True)
    total.backward()
    trainer.optimizer.step()
    trainer.scheduler.step()
    terms["total"] = total
    terms["grid_acc"] = (scores.detach().argmax(dim=1) == positive).float().mean()  # the positive scores highest
    return {k: float(v.detach()) for k, v in terms.items()}


def build_sampler(cfg: GSNConfig, data: ProductRetrievalData) -> GridSampler:
    return GridSampler(
        data.train_query_products,
        data.train_query_categories,
        data.train_gallery_products,
        data.train_gallery_categories,
        hard_fraction=cfg.hard_fraction,
        cells=cfg.cells,
    )


def train_one_epoch(trainer: Trainer, data: ProductRetrievalData, sampler: GridSampler, epoch: int) -> dict:
    """One grid per training query, ``grids_per_batch`` a step; per-epoch streams, so a resumed run replays them."""
    cfg = trainer.cfg
    trainer.model.train()
    rng = np.random.default_rng([cfg.seed, epoch])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = rng.permutation(len(data.train_query_products))
    steps = len(order) // cfg.grids_per_batch
    sums: dict[str, float] = {}
    bar = tqdm(range(steps), desc=f"{cfg.loss} {cfg.dataset}: epoch {epoch + 1}/{cfg.epochs}", leave=False)
    for s in bar:
        grids = sampler.sample(rng, order[s * cfg.grids_per_batch : (s + 1) * cfg.grids_per_batch])
        terms = training_step(trainer, make_step(data, grids, epoch, cfg.seed), gen)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{terms['total']:.3f}", acc=f"{terms['grid_acc']:.2f}")
    return {k: v / max(steps, 1) for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, eq=False)
class Embedded:
    """What the network gives a set of images: the model's embeddings (before the encoder's normalisation and
    transform), packed codes and the predicted category."""

    raw: np.ndarray
    codes: np.ndarray
    category: np.ndarray


@torch.inference_mode()
def embed(model: torch.nn.Module, prep: Preprocessing, pixels: np.ndarray, batch_size: int = 256, desc="embed"):
    """Run the model (eval mode) over uint8 pixels as the encoder does: same input conversion, same outputs."""
    model.eval()
    raw, codes, category = [], [], []
    for i in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch", leave=False):
        out = model(torch.from_numpy(to_model_input(pixels[i : i + batch_size], prep)))
        raw.append(out["embedding"].float().numpy())
        codes.append(pack_codes(out["hash"].float().numpy()))
        category.append(out["category"].argmax(dim=1).numpy())
    dim = model.embedding.out_features
    return Embedded(
        raw=np.concatenate(raw) if raw else np.zeros((0, dim), np.float32),
        codes=np.concatenate(codes) if codes else np.zeros((0, 0), np.uint8),
        category=np.concatenate(category) if category else np.zeros(0, np.int64),
    )


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Held-out metrics and the embeddings they came from (the transform search reuses them)."""

    metrics: dict
    queries: Embedded
    gallery: Embedded
    shop_queries: Embedded | None = None
    shop_gallery: Embedded | None = None


def product_metrics(data: ProductRetrievalData, queries: np.ndarray, gallery: np.ndarray, rows=None) -> dict:
    """The protocol's product-retrieval metrics of served query features (``rows`` of the held-out queries: all by
    default), ranked by inner product as the index ranks them."""
    rows = np.arange(len(data.eval_query_products)) if rows is None else np.asarray(rows)
    return product_retrieval_metrics(
        queries,
        data.eval_query_products[rows],
        gallery,
        data.eval_gallery_products,
        ks=(1, 10, 20),
        query_categories=data.eval_query_categories[rows],
        gallery_categories=data.eval_gallery_categories,
        category_map_at=(100,),
        normalise=False,
    )


def shop_metrics(data: ProductRetrievalData, queries: np.ndarray, gallery: np.ndarray, keep=None) -> dict:
    """Consumer-to-shop mAP@100 and P@10 of served features (``keep``: a mask over the shop protocol's queries)."""
    labels = data.shop.query_labels if keep is None else data.shop.query_labels[keep]
    m = category_retrieval_metrics(queries, labels, gallery, data.shop.gallery_labels, (100,), (10,), normalise=False)
    return {f"c2s_{k}": v for k, v in m.items()}


def evaluate(model: torch.nn.Module, data: ProductRetrievalData, with_shop: bool = True) -> Evaluation:
    """Every held-out metric of the untransformed features (see the module docstring)."""
    queries = embed(model, data.prep, data.eval_queries, desc="embed queries")
    gallery = embed(model, data.prep, data.eval_gallery, desc="embed gallery")
    metrics = product_metrics(data, serve_embeddings(queries.raw), serve_embeddings(gallery.raw))
    metrics["top1_acc"] = float((queries.category == data.eval_query_categories).mean())
    shop_q = shop_g = None
    if with_shop and data.shop is not None:
        shop_q = embed(model, data.prep, data.shop.query_pixels, desc="embed consumer photos")
        shop_g = embed(model, data.prep, data.shop.gallery_pixels, desc="embed shop photos")
        metrics.update(shop_metrics(data, serve_embeddings(shop_q.raw), serve_embeddings(shop_g.raw)))
    return Evaluation(metrics, queries, gallery, shop_q, shop_g)


# --------------------------------------------------------------------------------------- transform search

IDENTITY_ATOL = 1e-6
"""Features within this of the identity's (or of their negation), coordinate by coordinate, are the identity's:
a few float32 roundings of a unit vector, never a different ranking worth a transform."""


@dataclass(frozen=True, eq=False)
class TransformReward:
    """A retrieval metric of some held-out queries against the gallery, on the features a transform serves.

    The controller's reward is the one built from the select queries; the confirm queries get one of their own.
    ``query_index`` says which held-out queries these are.
    """

    query_raw: np.ndarray
    query_products: np.ndarray
    gallery_raw: np.ndarray
    gallery_products: np.ndarray
    metric: str  # a key of TRANSFORM_METRICS
    query_index: np.ndarray

    def features(self, transform: str | Expr | None) -> tuple[np.ndarray, np.ndarray]:
        """(query, gallery) features served with ``transform`` (None: the identity): :func:`serve_embeddings`."""
        return serve_embeddings(self.query_raw, transform), serve_embeddings(self.gallery_raw, transform)

    def score(self, transform: str | Expr | None) -> float:
        """The metric on the served features with ``transform`` (None: the identity, i.e. no transform)."""
        queries, gallery = self.features(transform)
        m = product_retrieval_metrics(
            queries, self.query_products, gallery, self.gallery_products, ks=(1,), normalise=False
        )
        return float(m[TRANSFORM_METRICS[self.metric]])

    def same_as_identity(self, transform: str | Expr) -> bool:
        """Whether the transform's features equal the identity's, or their negation, up to :data:`IDENTITY_ATOL`."""
        try:
            features = self.features(transform)
        except EmbeddingTransformError:
            return False
        identity = self.features(None)
        return any(
            all(np.allclose(sign * f, i, rtol=0.0, atol=IDENTITY_ATOL) for f, i in zip(features, identity))
            for sign in (1.0, -1.0)
        )

    def __call__(self, expr: Expr) -> float:
        try:
            return self.score(expr)
        except EmbeddingTransformError:  # non-finite, or erases a row: no usable transform
            return 0.0


def _storable(expression: str) -> bool:
    """Whether a bundle can carry the expression (canonical, uses x, finite and not constant on [-1, 1])."""
    try:
        parse_transform(expression)
    except EmbeddingTransformError:
        return False
    return True


def transform_split(products: np.ndarray, split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(select, confirm, report)`` held-out query indices: halves by product (``split_seed``), then the first
    half in two by product (``split_seed + 1``). Every query of a product is in one part."""
    search_idx, report_idx = split_by_product(products, 0.5, split_seed)
    select, confirm = split_by_product(products[search_idx], 0.5, split_seed + 1)
    return search_idx[select], search_idx[confirm], report_idx


def search_transform(cfg: GSNConfig, data: ProductRetrievalData, ev: Evaluation) -> tuple[str, dict, dict]:
    """Search an embedding transform on the select queries, confirm it, report it on the report half.

    Returns:
        ``(transform to store or "", summary for bundle.training, scalar metrics for bundle.metrics)``.
    """
    select_idx, confirm_idx, report_idx = transform_split(data.eval_query_products, cfg.split_seed)

    def reward_on(rows: np.ndarray) -> TransformReward:
        return TransformReward(
            query_raw=ev.queries.raw[rows],
            query_products=data.eval_query_products[rows],
            gallery_raw=ev.gallery.raw,
            gallery_products=data.eval_gallery_products,
            metric=cfg.transform_metric,
            query_index=rows,
        )

    select, confirm = reward_on(select_idx), reward_on(confirm_idx)
    identity_select, identity_confirm = select.score(None), confirm.score(None)
    started = time.perf_counter()
    result = search(
        EMBEDDING_GRAMMAR,
        select,
        steps=cfg.transform_steps,
        batch=cfg.transform_batch,
        seed=cfg.transform_seed,
        lr=cfg.transform_lr,
    )
    search_s = time.perf_counter() - started
    # The best expression a bundle can carry (one finite on the data but not on all of [-1, 1] cannot be served)
    # that is not the identity in disguise.
    ranked = result.top(len(result.rewards))
    best, best_select, disguised = "", float("nan"), []
    for expression, r in ranked:
        if r <= 0 or not _storable(expression):
            continue
        if select.same_as_identity(expression):
            disguised.append(expression)
            continue
        best, best_select = expression, r
        break
    best_confirm = float("nan")
    if best:
        best_confirm = confirm(parse_transform(best))
    gain = cfg.transform_min_gain
    adopted = bool(best) and best_select > identity_select + gain and best_confirm > identity_confirm + gain

    report, scalars = {}, {}
    report_q = ev.queries.raw[report_idx]
    shop_keep = None
    if ev.shop_queries is not None:
        shop_keep = np.isin(data.shop.query_eval_index, report_idx)
    for name, transform in (("untransformed", None), ("transformed", best or None)):
        if name == "transformed" and not best:
            continue
        q, g = serve_embeddings(report_q, transform), serve_embeddings(ev.gallery.raw, transform)
        m = product_metrics(data, q, g, report_idx)
        if shop_keep is not None:
            q = serve_embeddings(ev.shop_queries.raw[shop_keep], transform)
            m.update(shop_metrics(data, q, serve_embeddings(ev.shop_gallery.raw, transform), shop_keep))
        report[name] = {k: round(v, 4) for k, v in m.items()}
        prefix = "report_" if name == "untransformed" else "report_transformed_"
        scalars.update({prefix + k: round(v, 4) for k, v in m.items()})
    served = report["transformed" if adopted else "untransformed"]
    scalars.update({f"served_{k}": v for k, v in served.items()})

    def rounded(v: float) -> float | None:
        return None if np.isnan(v) else round(v, 4)

    summary = {
        "metric": cfg.transform_metric,
        "steps": cfg.transform_steps,
        "batch": cfg.transform_batch,
        "lr": cfg.transform_lr,
        "seed": cfg.transform_seed,
        "split_seed": cfg.split_seed,
        "select_queries": len(select_idx),
        "confirm_queries": len(confirm_idx),
        "report_queries": len(report_idx),
        "report_c2s_queries": int(shop_keep.sum()) if shop_keep is not None else 0,
        "identity_select_reward": round(identity_select, 4),
        "identity_confirm_reward": round(identity_confirm, 4),
        "best_expression": best,
        "best_select_reward": rounded(best_select),
        "best_confirm_reward": rounded(best_confirm),
        "min_gain": cfg.transform_min_gain,
        "adopted": adopted,
        "identity_equivalents_passed_over": disguised[:10],
        "n_identity_equivalents_passed_over": len(disguised),
        "n_evaluated": result.n_evaluated,
        "n_distinct": result.n_distinct,
        "top": [[e, round(r, 4)] for e, r in ranked[:10]],
        "history": [[round(h.mean_reward, 4), round(h.max_reward, 4)] for h in result.history],
        "report": report,
        "search_s": round(search_s, 1),
    }
    print(
        f"transform search: identity {identity_select:.4f} select / {identity_confirm:.4f} confirm; best "
        f"{best or '-'} {best_select:.4f} select / {best_confirm:.4f} confirm "
        f"({'adopted' if adopted else 'not adopted'}); report half {json.dumps(report)}"
    )
    return (best if adopted else ""), summary, scalars


# --------------------------------------------------------------------------------------------------- driver


@dataclass
class GSNRun:
    """What a run produced: the bundle, its metrics, timings and the transform search summary (or None)."""

    bundle: BundleConfig
    metrics: dict
    train_s: float
    eval_s: float
    transform: dict | None = None
    history: list = field(default_factory=list)


def main(cfg: GSNConfig, data: ProductRetrievalData | None = None) -> GSNRun:
    """Train, evaluate, optionally search a transform, and write the bundle to ``cfg.out``.

    Args:
        cfg: the run's configuration.
        data: already decoded data for ``cfg`` (a benchmark loads it once for many runs).
    """
    cfg.validate()
    keep_freed_memory_for_reuse()  # every step frees and re-allocates the same activations (see encoder.py)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    what = f"{cfg.epochs} epochs, {cfg.grids_per_batch} grids a step"
    print(f"training {cfg.loss} on {cfg.dataset}: seed {cfg.seed}, {what}")
    data = data or load_data(cfg)
    if data.dataset != cfg.dataset:
        raise ValueError(f"data is {data.dataset!r} but the config says {cfg.dataset!r}")
    sampler = build_sampler(cfg, data)
    steps_per_epoch = len(data.train_query_products) // cfg.grids_per_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{len(data.train_query_products)} training queries is fewer than one step of grids")
    trainer = build_trainer(cfg, data.prep, len(data.classes), steps_per_epoch)

    progress = resume_or_start(cfg, trainer, ignore=NOT_TRAINING)
    history = progress.history
    for epoch in range(progress.start_epoch, cfg.epochs):
        started = time.perf_counter()
        stats = train_one_epoch(trainer, data, sampler, epoch)
        progress.train_s += time.perf_counter() - started
        record = {"epoch": epoch + 1, **{f"loss_{k}": round(v, 4) for k, v in stats.items()}}
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            record.update({k: round(v, 4) for k, v in evaluate(trainer.model, data, with_shop=False).metrics.items()})
        history.append(record)
        print(json.dumps(record))
        progress.save(trainer, cfg, epoch)
    train_s = progress.train_s

    started = time.perf_counter()
    model = trainer.model.eval()
    ev = evaluate(model, data, with_shop=not cfg.no_c2s)
    eval_s = time.perf_counter() - started
    metrics = {k: round(v, 4) for k, v in ev.metrics.items()}
    print(f"held-out ({data.protocol}): {json.dumps(metrics)}")
    transform, summary = "", None
    if cfg.transform_steps > 0:
        transform, summary, report = search_transform(cfg, data, ev)
        metrics.update(report)
        served = {"queries": "report half", "n_queries": summary["report_queries"], "transform": transform}
    else:  # the bundle serves the untransformed features, which the headline metrics describe
        metrics.update({f"served_{k}": v for k, v in metrics.items() if k != "top1_acc"})
        served = {"queries": "all held-out", "n_queries": len(data.eval_query_products), "transform": ""}
    training = {
        "method": cfg.loss,
        "dataset": cfg.dataset,
        "protocol": data.protocol,
        "config": asdict(cfg),
        "history": history,
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "train_queries": len(data.train_query_products),
        "train_gallery": len(data.train_gallery_products),
        "eval_queries": len(data.eval_query_products),
        "eval_gallery": len(data.eval_gallery_products),
        "torch": torch.__version__,
        "served_metrics": served,
        **data.notes,
    }
    if data.shop is not None and not cfg.no_c2s:
        training["c2s"] = {
            "protocol": SHOP_PROTOCOL,
            "queries": len(data.shop.query_labels),
            "gallery": len(data.shop.gallery_labels),
            "left_out_classes": list(data.shop.left_out_classes),
        }
    if summary is not None:
        training["transform_search"] = summary
    bundle = BundleConfig(
        model_name="baseline_cnn",
        model_config=model_config(cfg, len(data.classes)),
        preprocessing=data.prep,
        embedding_dim=cfg.embedding_dim,
        hash_bits=cfg.hash_bits,
        categories=tuple(data.classes),
        training=training,
        metrics=metrics,
        embedding_transform=transform,
    )
    bundle = save_bundle(cfg.out, model, bundle)
    print(f"bundle {bundle.model_id} -> {cfg.out}  (train {train_s:.0f} s, evaluation {eval_s:.0f} s)")
    return GSNRun(bundle, metrics, train_s, eval_s, summary, history)


def get_args_parser() -> argparse.ArgumentParser:
    return config_args_parser(GSNConfig, __doc__.split("\n\n")[0])


def cli(argv: list[str] | None = None) -> int:
    cfg = config_from_args(GSNConfig, get_args_parser().parse_args(argv))
    try:
        main(cfg)  # validates the config first
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
