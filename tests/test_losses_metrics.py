"""Losses and metrics against naive reference loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval_core.eval.metrics import hit_rate_at_k
from retrieval_core.eval.retrieval import hamming_distances, rank_by_score
from retrieval_core.losses import QuantizationLoss, SupConLoss, create_loss


def naive_supcon(f: torch.Tensor, labels: list[int], t: float) -> float:
    f = torch.nn.functional.normalize(f, dim=1).tolist()
    n = len(f)
    sim = [[sum(a * b for a, b in zip(f[i], f[j])) / t for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(sim[i][a]) for a in range(n) if a != i)
        losses.append(-sum(math.log(math.exp(sim[i][p]) / denom) for p in positives) / len(positives))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(9, 5, generator=g)
    labels = [0, 0, 1, 1, 1, 2, 3, 3, 4]  # includes anchors without positives (2, 4)
    got = SupConLoss(temperature=0.2)(f, torch.tensor(labels))
    assert float(got) == pytest.approx(naive_supcon(f, labels, 0.2), rel=1e-5)


def test_supcon_without_positives_is_zero_and_differentiable():
    f = torch.randn(3, 4, requires_grad=True)
    loss = SupConLoss()(f, torch.tensor([0, 1, 2]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and f.grad is not None


def test_quantization_loss_naive():
    h = torch.tensor([[1.0, -1.0, 0.0, 0.5]])
    assert float(QuantizationLoss()(h)) == pytest.approx((0 + 0 + 1 + 0.25) / 4)
    assert isinstance(create_loss("quantization"), QuantizationLoss)
    with pytest.raises(KeyError):
        create_loss("nope")


def test_hit_rate_at_k_naive():
    rng = np.random.default_rng(0)
    ranked = rng.integers(0, 5, (40, 10))
    targets = rng.integers(0, 5, 40)
    for k in (1, 3, 10):
        naive = sum(any(ranked[q, j] == targets[q] for j in range(k)) for q in range(40)) / 40
        assert hit_rate_at_k(ranked, targets, k) == pytest.approx(naive)
    with pytest.raises(ValueError):
        hit_rate_at_k(ranked, targets, 11)


def test_hamming_distances_naive():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (5, 3), dtype=np.uint8), rng.integers(0, 256, (7, 3), dtype=np.uint8)
    naive = [[sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a[i], b[j])) for j in range(7)] for i in range(5)]
    assert hamming_distances(a, b).tolist() == naive


def test_rank_ties_by_lower_index():
    scores = np.array([[0.5, 0.9, 0.9, 0.1]])
    assert rank_by_score(scores, 3).tolist() == [[1, 2, 0]]
    assert rank_by_score(np.array([[2, 1, 1, 0]]), 3, higher_is_better=False).tolist() == [[3, 1, 2]]
