"""Train the baseline bundle on a synthetic garment catalog (CPU, a few minutes).

    python -m retrieval_core.train.baseline --out artifacts/bundles/baseline --data artifacts/train_catalog

Loss = category CE + attribute CE + supervised contrastive on products (shop and
consumer views of one product are positives) for the embedding and for the
relaxed hash codes + a quantisation loss pulling codes to +-1. The training
catalog uses its own seed, so the products ``make index`` evaluates on are
never seen in training. Seeded, resumable (``--resume``), tqdm progress.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrieval_core.bundle import BundleConfig, save_bundle
from retrieval_core.data.synthetic import ATTRIBUTE_VALUES, CATEGORIES, SyntheticConfig, generate_catalog
from retrieval_core.encoder import pack_codes
from retrieval_core.eval.retrieval import consumer_to_shop_recall
from retrieval_core.losses import create_loss
from retrieval_core.models import create_model
from retrieval_core.preprocess import Preprocessing, load_image_file, to_model_input
from retrieval_core.train.common import (
    augment,
    config_args_parser,
    config_from_args,
    load_checkpoint,
    save_checkpoint,
    work_dir,
)

ATTRIBUTES = ("colour", "pattern", "sleeve_length")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; dumped beside the checkpoint."""

    out: str = "artifacts/bundles/baseline"
    data: str = "artifacts/train_catalog"
    products_per_category: int = 120
    consumer_views: int = 3
    data_seed: int = 1  # the default catalog that gets indexed uses seed 0: disjoint products
    image_size: int = 64
    embedding_dim: int = 128
    hash_bits: int = 64
    widths: tuple[int, ...] = (24, 48, 96, 192)
    epochs: int = 18
    batch_products: int = 48
    lr: float = 3e-3
    weight_decay: float = 5e-4
    temperature: float = 0.1
    w_category: float = 1.0
    w_attributes: float = 0.5
    w_metric: float = 1.0
    w_hash: float = 0.5
    w_quant: float = 0.1
    val_fraction: float = 0.15
    seed: int = 0
    threads: int = 0  # 0: torch's default
    resume: bool = False


def get_args_parser() -> argparse.ArgumentParser:
    return config_args_parser(TrainConfig, __doc__.split("\n\n")[0])


@dataclass
class Dataset:
    pixels: np.ndarray  # (N, S, S, 3) uint8
    product: np.ndarray  # (N,) int
    product_ids: np.ndarray  # (N,) str
    views: np.ndarray  # (N,) str
    category: np.ndarray  # (N,) int
    attributes: dict[str, np.ndarray]


def load_dataset(catalog_csv: str, prep: Preprocessing) -> Dataset:
    """Decode every image of a synthetic catalog with the bundle's preprocessing."""
    with open(catalog_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    base = os.path.dirname(os.path.abspath(catalog_csv))
    pixels = np.stack(
        [
            load_image_file(os.path.join(base, r["image_uri"]), prep).pixels
            for r in tqdm(rows, desc="decode", unit="img", leave=False)
        ]
    )
    products = sorted({r["product_id"] for r in rows})
    index = {p: i for i, p in enumerate(products)}
    return Dataset(
        pixels=pixels,
        product=np.array([index[r["product_id"]] for r in rows]),
        product_ids=np.array([r["product_id"] for r in rows]),
        views=np.array([r["view"] for r in rows]),
        category=np.array([CATEGORIES.index(r["category"]) for r in rows]),
        attributes={a: np.array([ATTRIBUTE_VALUES[a].index(r[a]) for r in rows]) for a in ATTRIBUTES},
    )


def batches(data: Dataset, products: np.ndarray, batch_products: int, rng: np.random.Generator):
    """Batches of P products x 2 distinct views each (every product has at least two)."""
    views_of: dict[int, np.ndarray] = {}
    for i, p in enumerate(data.product):
        views_of.setdefault(int(p), []).append(i)
    order = rng.permutation(products)
    for start in range(0, len(order) - batch_products + 1, batch_products):
        idx = [j for p in order[start : start + batch_products] for j in rng.choice(views_of[int(p)], 2, replace=False)]
        yield np.array(idx)


def compute_losses(out: dict, data: Dataset, idx: np.ndarray, cfg: TrainConfig, losses: dict) -> dict:
    product = torch.from_numpy(data.product[idx])
    terms = {
        "category": F.cross_entropy(out["category"], torch.from_numpy(data.category[idx])),
        "attributes": sum(
            F.cross_entropy(out[f"attr.{a}"], torch.from_numpy(data.attributes[a][idx])) for a in ATTRIBUTES
        )
        / len(ATTRIBUTES),
        "metric": losses["supcon"](out["embedding"], product),
        "hash": losses["supcon"](out["hash"], product),
        "quant": losses["quant"](out["hash"]),
    }
    weights = {
        "category": cfg.w_category,
        "attributes": cfg.w_attributes,
        "metric": cfg.w_metric,
        "hash": cfg.w_hash,
        "quant": cfg.w_quant,
    }
    terms["total"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def train_one_epoch(
    model, optimizer, scheduler, data: Dataset, products: np.ndarray, cfg: TrainConfig, epoch: int, losses: dict
) -> dict[str, float]:
    model.train()
    rng = np.random.default_rng([cfg.seed, epoch])  # per-epoch stream: resuming replays the same batches
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    prep = Preprocessing(image_size=cfg.image_size)
    sums: dict[str, float] = {}
    steps = list(batches(data, products, cfg.batch_products, rng))
    for idx in tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False):
        x = augment(torch.from_numpy(to_model_input(data.pixels[idx], prep)), gen)
        terms = compute_losses(model(x), data, idx, cfg, losses)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        scheduler.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return {k: v / max(len(steps), 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(model, data: Dataset, mask: np.ndarray, image_size: int) -> dict[str, float]:
    """Consumer->shop recall@1/10 (embeddings and Hamming) and category accuracy on the ``mask`` rows."""
    model.eval()
    prep = Preprocessing(image_size=image_size)
    idx = np.flatnonzero(mask)
    outs = [
        model(torch.from_numpy(to_model_input(data.pixels[idx[i : i + 256]], prep))) for i in range(0, len(idx), 256)
    ]
    emb = torch.cat([o["embedding"] for o in outs]).numpy()
    codes = pack_codes(torch.cat([o["hash"] for o in outs]).numpy())
    acc = float((torch.cat([o["category"] for o in outs]).argmax(1).numpy() == data.category[idx]).mean())
    return {**consumer_to_shop_recall(emb, codes, data.product_ids[idx], data.views[idx]), "category_acc": acc}


def main(cfg: TrainConfig) -> BundleConfig:
    """Train and write the bundle to ``cfg.out``; returns its config."""
    started = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"training baseline bundle: seed {cfg.seed}, {cfg.epochs} epochs, data {cfg.data}")
    catalog = generate_catalog(
        cfg.data,
        SyntheticConfig(
            products_per_category=cfg.products_per_category, consumer_views=cfg.consumer_views, seed=cfg.data_seed
        ),
        progress=True,
    )
    prep = Preprocessing(image_size=cfg.image_size)
    data = load_dataset(str(catalog), prep)
    n_products = int(data.product.max()) + 1
    val_products = np.random.default_rng(cfg.seed).permutation(n_products)[: max(2, int(n_products * cfg.val_fraction))]
    val_mask = np.isin(data.product, val_products)
    train_products = np.setdiff1d(np.arange(n_products), val_products)

    model_config = {
        "embedding_dim": cfg.embedding_dim,
        "hash_bits": cfg.hash_bits,
        "num_categories": len(CATEGORIES),
        "attribute_classes": {a: len(ATTRIBUTE_VALUES[a]) for a in ATTRIBUTES},
        "widths": list(cfg.widths),
    }
    model = create_model("baseline_cnn", **model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_products) // cfg.batch_products
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    losses = {"supcon": create_loss("supcon", temperature=cfg.temperature), "quant": create_loss("quantization")}

    ckpt_path = os.path.join(work_dir(cfg.out, cfg), "checkpoint.pt")
    start_epoch, history = 0, []
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = int(ckpt["epoch"]), json.loads(ckpt["history"])
        print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    for epoch in range(start_epoch, cfg.epochs):
        stats = train_one_epoch(model, optimizer, scheduler, data, train_products, cfg, epoch, losses)
        record = {"epoch": epoch + 1, **{f"loss_{k}": round(v, 4) for k, v in stats.items()}}
        if (epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs:
            record.update({k: round(v, 4) for k, v in evaluate(model, data, val_mask, cfg.image_size).items()})
        history.append(record)
        print(json.dumps(record))
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "history": json.dumps(history),
            },
        )

    metrics = evaluate(model, data, val_mask, cfg.image_size)
    bundle = BundleConfig(
        model_name="baseline_cnn",
        model_config=model_config,
        preprocessing=prep,
        embedding_dim=cfg.embedding_dim,
        hash_bits=cfg.hash_bits,
        categories=CATEGORIES,
        attributes={a: ATTRIBUTE_VALUES[a] for a in ATTRIBUTES},
        training={
            "config": asdict(cfg),
            "history": history,
            "wall_s": round(time.time() - started, 1),
            "torch": torch.__version__,
            "val_products": int(len(val_products)),
        },
        metrics={k: round(v, 4) for k, v in metrics.items()},
    )
    bundle = save_bundle(cfg.out, model.eval(), bundle)
    print(
        f"bundle {bundle.model_id} -> {cfg.out}  validation {json.dumps(bundle.metrics)}  "
        f"({time.time() - started:.0f} s)"
    )
    return bundle


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = config_from_args(TrainConfig, args)
    if cfg.epochs < 1 or cfg.batch_products < 2:
        raise SystemExit("--epochs must be >= 1 and --batch_products >= 2")
    main(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
