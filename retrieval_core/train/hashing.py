"""Train deep semantic hashing: ADSH (adversarial), or DCH with ``--no-adversary``.

    python -m retrieval_core.train.hashing --dataset fashion-mnist --bits 48 --out artifacts/bundles/adsh-48
    python -m retrieval_core.train.hashing --dataset fashion-mnist --bits 48 --no-adversary --out .../dch-48

The network is the baseline CNN (a category head, a K-bit hash head: tanh in training, sign at inference).
Loss = category cross-entropy + Deep Cauchy Hashing's pairwise loss on the relaxed codes + its quantisation
loss (``lambda``) + a supervised contrastive loss on the float embedding (what the float index, and the LSH
and ITQ baselines, use), and for ADSH an adversarial term: a discriminator on (image feature, code) pairs learns to
tell an image's own code from a same-class image's code, and the hashing network learns to fool it. The
discriminator has its own optimiser. Everything else is identical with and without the adversary.

Data and protocol (the database is what the network trains on; queries are never seen in training):

- ``fashion-mnist``: the real IDX files; database = the 60,000 train images, queries = the 10,000 test images.
- ``clothing-small``: real consumer photos; database = ``train/``, queries = ``validation/``.
- ``fashion-product-small``: real shop photos; queries = a seeded 10% of the ids with an image, database =
  the rest; label = ``articleType``.

Photos are decoded by the pipeline's own decoder and preprocessing (and cached), and the photo databases
are ordered by a hash of the item id, so that Hamming ties (broken by database position) favour no class.
Relevant = same label. The
bundle's metrics are this protocol's Hamming-ranking metrics (``retrieval_core.eval.hashing``). Seeded,
resumable (``--resume``), tqdm progress; the bundle indexes with the pipeline as is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrieval_core.bundle import BundleConfig, save_bundle
from retrieval_core.data import fashion_mnist, real_photos
from retrieval_core.encoder import Encoder, keep_freed_memory_for_reuse
from retrieval_core.eval.hashing import hamming_ranking_metrics
from retrieval_core.losses import create_loss
from retrieval_core.losses.hashing import same_class_partners
from retrieval_core.models import create_model
from retrieval_core.models.hashing import CodePairDiscriminator
from retrieval_core.preprocess import Preprocessing, to_model_input
from retrieval_core.train.common import augment, config_args_parser, config_from_args, resume_or_start

DATASETS = ("fashion-mnist", "clothing-small", "fashion-product-small")
ADVERSARIES = ("pair", "prior")
PROTOCOLS = {
    "fashion-mnist": "test-vs-train-same-class",
    "clothing-small": "validation-vs-train-same-class",
    "fashion-product-small": "10pct-ids-vs-rest-same-articletype",
}
# Fashion-MNIST's pixel statistics (on [0, 1]); grey images go through the model as three equal channels.
FASHION_MNIST_PREP = Preprocessing(image_size=28, mean=(0.286,) * 3, std=(0.353,) * 3, resize="stretch", pad_value=0)
# Centred 28 px greyscale items want gentle augmentation; photos get the consumer-photo recipe.
AUGMENT = {
    "fashion-mnist": {"max_angle": 0.1, "scale": (0.9, 1.1), "max_shift": 0.1, "brightness": (0.9, 1.1)},
    "clothing-small": {},
    "fashion-product-small": {"max_angle": 0.1, "max_shift": 0.1},
}


@dataclass(frozen=True)
class HashingConfig:
    """Everything that determines a training run; dumped beside the checkpoint."""

    out: str = "artifacts/bundles/adsh-48"
    dataset: str = "fashion-mnist"
    data_dir: str = ""  # "": $RETRIEVAL_DATA_DIR (fashion-mnist: then /usr/share/datasets/fashion-mnist)
    cache_dir: str = "artifacts/cache"  # decoded photos, keyed by file list and preprocessing
    image_size: int = 64  # photos only; Fashion-MNIST stays 28 x 28
    bits: int = 48
    embedding_dim: int = 128
    widths: tuple[int, ...] = (24, 48, 96, 192)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    gamma: float = 20.0  # Cauchy scale
    quant_lambda: float = 0.1  # weight of the quantisation loss
    w_cauchy: float = 1.0
    w_category: float = 1.0
    w_embedding: float = 0.5  # supervised contrastive loss on the float embedding (its index, LSH and ITQ use it)
    temperature: float = 0.1  # of that loss
    w_adv: float = 0.1
    no_adversary: bool = False  # DCH: everything else equal
    adversary: str = "pair"  # pair: own code vs a same-class image's code; prior: codes vs uniform +-1 draws
    adv_binary: bool = True  # the discriminator sees sign(h) (straight-through); False: the tanh codes
    lr_disc: float = 1e-4  # slow: a discriminator that wins early pushes codes apart (make bench-hashing-ablation)
    disc_hidden: int = 256
    limit_train: int = 0  # > 0: a seeded random slice of the database (for quick runs)
    limit_query: int = 0
    split_seed: int = 0  # fashion-product-small's query split
    seed: int = 0
    threads: int = 0  # 0: torch's default
    resume: bool = False

    @property
    def method(self) -> str:
        if not self.no_adversary:
            return "adsh"
        return "dch" if self.w_cauchy > 0 else "classifier"

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.bits <= 0 or self.bits % 8:
            raise ValueError(f"--bits must be a positive multiple of 8 (codes are stored as bytes), got {self.bits}")
        if self.adversary not in ADVERSARIES:
            raise ValueError(f"--adversary must be one of {ADVERSARIES}, got {self.adversary!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("--epochs must be >= 1 and --batch_size >= 2")


@dataclass
class HashingData:
    """Decoded images of one protocol: the database (trained on) and the held-out queries."""

    dataset: str
    protocol: str
    prep: Preprocessing
    classes: tuple[str, ...]
    db_pixels: np.ndarray  # (N, S, S, 3) uint8
    db_labels: np.ndarray  # (N,) int64
    query_pixels: np.ndarray
    query_labels: np.ndarray
    notes: dict = field(default_factory=dict)


def _seeded_slice(n: int, limit: int, seed: int) -> np.ndarray:
    """All of ``range(n)``, or a seeded random ``limit`` of it in ascending order."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _id_hash_order(ids: tuple[str, ...], keep: np.ndarray) -> np.ndarray:
    """``keep`` sorted by the sha256 of each item's id: a fixed database order unrelated to the class.

    Hamming ranking breaks ties by database position (``retrieval_core.eval.hashing``). That is neutral only
    when the order says nothing about relevance: the photo folders list files class by class, and the shop
    ids were assigned in catalogue batches (neighbouring ids mostly share an article type), so either
    order would favour or penalise whole classes inside a tie.
    """
    keys = [hashlib.sha256(ids[i].encode()).hexdigest() for i in keep]
    return keep[np.argsort(keys, kind="stable")]


def _decode(files: real_photos.LabelledFiles, keep: np.ndarray, prep: Preprocessing, cfg: HashingConfig, what: str):
    """Decode the ``keep`` rows of ``files``; returns (pixels, labels, number of undecodable files)."""
    paths = [files.paths[i] for i in keep]
    pixels, ok = real_photos.decode_files(paths, prep, cache_dir=cfg.cache_dir or None, desc=what)
    return pixels, files.labels[keep][ok], int((~ok).sum())


def fashion_mnist_dir(data_dir: str = "") -> Path:
    """``<data_dir>/fashion-mnist`` when it has the files, else where ``fashion_mnist.find_dir`` finds them.

    Raises:
        FashionMNISTError: nowhere; the message says how to install the Debian package.
    """
    if data_dir:
        try:
            return fashion_mnist.find_dir(Path(data_dir) / "fashion-mnist")
        except fashion_mnist.FashionMNISTError:
            pass
    return fashion_mnist.find_dir()


def load_data(cfg: HashingConfig) -> HashingData:
    """Read and decode the protocol's database and queries (photos through the pipeline's decoder).

    ``limit_train`` / ``limit_query`` take seeded random slices before decoding, so a quick run decodes
    only what it uses.
    """

    def folder(name: str) -> str | None:
        return os.path.join(cfg.data_dir, name) if cfg.data_dir else None

    if cfg.dataset == "fashion-mnist":
        fm_dir = fashion_mnist_dir(cfg.data_dir)
        db, db_labels = fashion_mnist.load("train", fm_dir)
        query, query_labels = fashion_mnist.load("test", fm_dir)
        keep_db = _seeded_slice(len(db_labels), cfg.limit_train, cfg.seed)
        keep_query = _seeded_slice(len(query_labels), cfg.limit_query, cfg.seed + 1)
        # Grey items go through the model as three equal channels, as the pipeline decodes a grey PNG.
        db, query = (np.repeat(a[..., None], 3, axis=3) for a in (db[keep_db], query[keep_query]))
        db_labels, query_labels = db_labels[keep_db], query_labels[keep_query]
        prep, classes, notes = FASHION_MNIST_PREP, fashion_mnist.CLASSES, {"source": str(fm_dir)}
    else:
        prep = Preprocessing(image_size=cfg.image_size)
        if cfg.dataset == "clothing-small":
            db_files = real_photos.clothing_small("train", folder("clothing-small"))
            query_files = real_photos.clothing_small("validation", folder("clothing-small"))
        else:
            query_files, db_files = real_photos.fashion_product_split(
                seed=cfg.split_seed, data_dir=folder("fashion-product-small")
            )
        keep_db = _id_hash_order(db_files.ids, _seeded_slice(len(db_files), cfg.limit_train, cfg.seed))
        keep_query = _seeded_slice(len(query_files), cfg.limit_query, cfg.seed + 1)
        db, db_labels, db_failed = _decode(db_files, keep_db, prep, cfg, f"decode {cfg.dataset} database")
        query, query_labels, query_failed = _decode(query_files, keep_query, prep, cfg, f"decode {cfg.dataset} queries")
        classes, notes = db_files.classes, {"undecodable_images": db_failed + query_failed}
    return HashingData(
        dataset=cfg.dataset,
        protocol=PROTOCOLS[cfg.dataset],
        prep=prep,
        classes=tuple(classes),
        db_pixels=db,
        db_labels=np.asarray(db_labels, dtype=np.int64),
        query_pixels=query,
        query_labels=np.asarray(query_labels, dtype=np.int64),
        notes=notes,
    )


@dataclass
class Trainer:
    """The hashing network, its losses and optimisers, and (for ADSH) the discriminator and its optimiser."""

    cfg: HashingConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    losses: dict
    discriminator: torch.nn.Module | None = None
    optimizer_disc: torch.optim.Optimizer | None = None

    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["optimizer_disc"] = self.optimizer_disc.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.optimizer_disc.load_state_dict(state["optimizer_disc"])


def model_config(cfg: HashingConfig, n_classes: int) -> dict:
    return {
        "embedding_dim": cfg.embedding_dim,
        "hash_bits": cfg.bits,
        "num_categories": n_classes,
        "attribute_classes": {},
        "widths": list(cfg.widths),
    }


def build_trainer(cfg: HashingConfig, n_classes: int, steps_per_epoch: int) -> Trainer:
    model = create_model("baseline_cnn", **model_config(cfg, n_classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    losses = {
        "cauchy": create_loss("cauchy", gamma=cfg.gamma),
        "quant": create_loss("cauchy_quantization", gamma=cfg.gamma),
        "adv": create_loss(f"{cfg.adversary}_adversarial", binary=cfg.adv_binary),
        "embedding": create_loss("supcon", temperature=cfg.temperature),
    }
    trainer = Trainer(cfg, model, optimizer, scheduler, losses)
    if not cfg.no_adversary:
        feature_dim = cfg.embedding_dim if cfg.adversary == "pair" else 0
        trainer.discriminator = CodePairDiscriminator(feature_dim, cfg.bits, cfg.disc_hidden)
        trainer.optimizer_disc = torch.optim.Adam(trainer.discriminator.parameters(), lr=cfg.lr_disc, betas=(0.5, 0.9))
    return trainer


def training_step(trainer: Trainer, x: torch.Tensor, labels: torch.Tensor, pair_gen: torch.Generator) -> dict:
    """One optimiser step of the hashing network (and, for ADSH, first one of the discriminator).

    ``pair_gen`` draws the adversary's same-class partners (or its prior codes); it is not the augmentation
    stream, so ADSH and DCH runs of one seed see the same augmented batches.
    """
    cfg, model = trainer.cfg, trainer.model
    out = model(x)
    codes = out["hash"]
    terms = {
        "category": F.cross_entropy(out["category"], labels),
        "embedding": trainer.losses["embedding"](out["embedding"], labels),
        "cauchy": trainer.losses["cauchy"](codes, labels),
        "quant": trainer.losses["quant"](codes),
    }
    weights = {
        "category": cfg.w_category,
        "embedding": cfg.w_embedding,
        "cauchy": cfg.w_cauchy,
        "quant": cfg.quant_lambda,
    }
    if trainer.discriminator is not None:
        adv, disc = trainer.losses["adv"], trainer.discriminator
        if cfg.adversary == "prior":  # codes against uniform +-1 draws; the losses detach what they must
            d_args, g_args = (codes, adv.sample_prior(codes, pair_gen)), (codes,)
        else:
            anchors, partners = same_class_partners(labels, pair_gen)
            # The discriminator sees detached features and codes; the network is trained against it below
            # with detached features too, so the adversary shapes the codes only and cannot win by blurring
            # the features. A batch without a same-class pair has nothing to compare: no adversarial step.
            features = out["embedding"].detach()
            d_args = g_args = (features, codes, anchors, partners) if anchors.numel() else None
        if d_args is not None:
            d_loss = adv.discriminator_loss(disc, *d_args)
            trainer.optimizer_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            trainer.optimizer_disc.step()
            terms["disc"] = d_loss.detach()
            terms["adv"] = adv.generator_loss(disc, *g_args)
            weights["adv"] = cfg.w_adv
    total = sum(weights[k] * terms[k] for k in weights)
    trainer.optimizer.zero_grad(set_to_none=True)
    total.backward()
    trainer.optimizer.step()
    trainer.scheduler.step()
    terms["total"] = total
    return {k: float(v.detach()) for k, v in terms.items()}


def train_one_epoch(trainer: Trainer, data: HashingData, epoch: int) -> dict[str, float]:
    cfg = trainer.cfg
    trainer.model.train()
    if trainer.discriminator is not None:
        trainer.discriminator.train()
    rng = np.random.default_rng([cfg.seed, epoch])  # per-epoch streams: a resumed run replays the same batches
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    pair_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 1_000_000)
    order = rng.permutation(len(data.db_labels))
    steps = len(order) // cfg.batch_size
    sums: dict[str, float] = {}
    bar = tqdm(range(steps), desc=f"{cfg.method} {cfg.bits} bits: epoch {epoch + 1}/{cfg.epochs}", leave=False)
    for step in bar:
        idx = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        x = torch.from_numpy(to_model_input(data.db_pixels[idx], data.prep))
        x = augment(x, gen, **AUGMENT[cfg.dataset])
        terms = training_step(trainer, x, torch.from_numpy(data.db_labels[idx]), pair_gen)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{terms['total']:.3f}")
    return {k: v / max(steps, 1) for k, v in sums.items()}


def encode(encoder: Encoder, pixels: np.ndarray, batch_size: int = 512, desc: str = "encode") -> dict:
    """Embeddings, packed codes and predicted categories, through the pipeline's ``Encoder``."""
    parts = [
        encoder.encode(pixels[i : i + batch_size])
        for i in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch", leave=False)
    ]
    index = {c: i for i, c in enumerate(encoder.config.categories)}
    return {
        "embeddings": np.concatenate([p.embeddings for p in parts]),
        "codes": np.concatenate([p.codes for p in parts]),
        "category": np.array([index[c] for p in parts for c in p.category], dtype=np.int64),
    }


@dataclass
class HashingRun:
    """What a training run produced: the bundle, its protocol metrics, timings, and the encoded splits."""

    bundle: BundleConfig
    metrics: dict
    train_s: float
    encode_s: float
    db: dict
    queries: dict


def protocol_metrics(query_codes, query_labels, db_codes, db_labels) -> dict:
    """The benchmark's Hamming-ranking metrics: mAP@all, mAP@1000, P@100, P@1000, precision within radius 2.

    Cut-offs larger than the database (tiny test runs) are left out.
    """
    cutoffs = tuple(k for k in (100, 1000) if k <= len(db_labels))
    return hamming_ranking_metrics(
        query_codes, query_labels, db_codes, db_labels, ks=cutoffs, map_at=cutoffs[-1:], radii=(2,)
    )


def evaluate(encoder: Encoder, data: HashingData) -> tuple[dict, float, dict, dict]:
    """Encode both splits; Hamming-ranking metrics of the queries against the database (relevant = same label)."""
    started = time.perf_counter()
    db = encode(encoder, data.db_pixels, desc="encode database")
    queries = encode(encoder, data.query_pixels, desc="encode queries")
    encode_s = time.perf_counter() - started
    metrics = protocol_metrics(queries["codes"], data.query_labels, db["codes"], data.db_labels)
    metrics["top1_acc"] = float((queries["category"] == data.query_labels).mean())
    return metrics, encode_s, db, queries


def main(cfg: HashingConfig, data: HashingData | None = None) -> HashingRun:
    """Train, write the bundle to ``cfg.out``, and evaluate it on the protocol.

    Args:
        cfg: the run's configuration.
        data: already decoded data for ``cfg`` (the benchmark loads it once for many runs).
    """
    cfg.validate()
    keep_freed_memory_for_reuse()  # every step frees and re-allocates the same activations (see encoder.py)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"training {cfg.method} on {cfg.dataset}: {cfg.bits} bits, seed {cfg.seed}, {cfg.epochs} epochs")
    data = data or load_data(cfg)
    steps_per_epoch = len(data.db_labels) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(data.db_labels)} training images is fewer than one batch of {cfg.batch_size}")
    trainer = build_trainer(cfg, len(data.classes), steps_per_epoch)

    progress = resume_or_start(cfg, trainer)
    history = progress.history
    for epoch in range(progress.start_epoch, cfg.epochs):
        started = time.perf_counter()
        stats = train_one_epoch(trainer, data, epoch)
        progress.train_s += time.perf_counter() - started
        history.append({"epoch": epoch + 1, **{f"loss_{k}": round(v, 4) for k, v in stats.items()}})
        print(json.dumps(history[-1]))
        progress.save(trainer, cfg, epoch)
    train_s = progress.train_s

    bundle = BundleConfig(
        model_name="baseline_cnn",
        model_config=model_config(cfg, len(data.classes)),
        preprocessing=data.prep,
        embedding_dim=cfg.embedding_dim,
        hash_bits=cfg.bits,
        categories=data.classes,
        training={
            "method": cfg.method,
            "dataset": cfg.dataset,
            "protocol": data.protocol,
            "config": asdict(cfg),
            "history": history,
            "train_s": round(train_s, 1),
            "database_size": int(len(data.db_labels)),
            "query_size": int(len(data.query_labels)),
            "torch": torch.__version__,
            **data.notes,
        },
    )
    metrics, encode_s, db, queries = evaluate(Encoder(bundle, trainer.model.eval()), data)
    scalars = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    bundle = save_bundle(cfg.out, trainer.model.eval(), replace(bundle, metrics=scalars))
    print(f"bundle {bundle.model_id} -> {cfg.out}  {json.dumps(scalars)}  (train {train_s:.0f} s)")
    return HashingRun(bundle, metrics, train_s, encode_s, db, queries)


def get_args_parser() -> argparse.ArgumentParser:
    p = config_args_parser(HashingConfig, __doc__.split("\n\n")[0])
    # argparse turns --no_adversary into the field; also accept the spelling.
    p.add_argument("--no-adversary", dest="no_adversary", action="store_true", help="train DCH (no adversary)")
    return p


def cli(argv: list[str] | None = None) -> int:
    cfg = config_from_args(HashingConfig, get_args_parser().parse_args(argv))
    try:
        main(cfg)  # validates the config first
    except (ValueError, fashion_mnist.FashionMNISTError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
