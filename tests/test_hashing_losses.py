"""Deep-hashing losses against naive loops, the partner sampler, and the LSH / ITQ baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval_core.losses import create_loss
from retrieval_core.losses.hashing import (
    CauchyHashingLoss,
    CauchyQuantizationLoss,
    PairAdversarialLoss,
    PriorAdversarialLoss,
    relaxed_hamming_distance,
    same_class_partners,
    straight_through_sign,
)
from retrieval_core.models.hashing import CodePairDiscriminator
from retrieval_core.models.projection_hashing import ITQ, LSH


def naive_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    cos = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    return len(a) / 2 * (1 - cos)


def naive_cauchy(codes: torch.Tensor, labels: list[int], gamma: float, balance: bool) -> float:
    h = codes.tolist()
    n = len(h)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    n_similar = sum(labels[i] == labels[j] for i, j in pairs)
    total = 0.0
    for i, j in pairs:
        d = naive_distance(h[i], h[j])
        p_similar = gamma / (gamma + d)
        if labels[i] == labels[j]:
            w = len(pairs) / n_similar if balance else 1.0
            total += w * -math.log(p_similar)
        else:
            w = len(pairs) / (len(pairs) - n_similar) if balance else 1.0
            total += w * -math.log(1 - p_similar)
    return total / len(pairs)


def test_relaxed_distance_is_hamming_on_sign_codes():
    b = torch.tensor([[1.0, -1, 1, 1, -1, -1, 1, 1], [-1.0, -1, 1, -1, -1, 1, 1, 1]])
    assert torch.allclose(relaxed_hamming_distance(b, b), torch.tensor([[0.0, 3.0], [3.0, 0.0]]), atol=1e-5)


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_cauchy_loss_matches_naive_loop(seed, balance):
    g = torch.Generator().manual_seed(seed)
    codes = torch.tanh(2 * torch.randn(8, 16, generator=g))
    labels = [0, 0, 0, 1, 1, 2, 3, 3]
    got = CauchyHashingLoss(gamma=5.0, balance=balance)(codes, torch.tensor(labels))
    assert float(got) == pytest.approx(naive_cauchy(codes, labels, 5.0, balance), rel=1e-4)


def test_cauchy_loss_takes_an_injected_distance():
    calls = []

    def euclidean(a, b):
        calls.append(a.shape)
        return torch.cdist(a, b)

    codes, labels = torch.randn(5, 8), torch.tensor([0, 0, 1, 1, 2])
    CauchyHashingLoss(gamma=2.0, distance=euclidean)(codes, labels)
    assert calls == [(5, 8)]


def test_cauchy_loss_gradient_pulls_similar_and_pushes_dissimilar():
    codes = torch.tensor([[1.0, 0.2, -0.5, 0.1], [0.3, -0.9, 0.4, 0.8], [-0.2, 0.5, 0.6, -0.7]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    loss_fn = CauchyHashingLoss(gamma=2.0)
    loss_fn(codes, labels).backward()
    with torch.no_grad():
        stepped = codes - 0.05 * codes.grad
        d_before, d_after = relaxed_hamming_distance(codes, codes), relaxed_hamming_distance(stepped, stepped)
    assert d_after[0, 1] < d_before[0, 1]  # same class: closer
    assert d_after[0, 2] > d_before[0, 2] and d_after[1, 2] > d_before[1, 2]  # different class: further


def test_cauchy_loss_is_finite_for_identical_dissimilar_codes():
    codes = torch.ones(2, 8, requires_grad=True)
    loss = CauchyHashingLoss()(codes, torch.tensor([0, 1]))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(codes.grad).all()


def test_quantization_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(3)
    codes = torch.tanh(torch.randn(6, 16, generator=g))
    naive = sum(math.log(1 + naive_distance([abs(x) for x in row], [1.0] * 16) / 20.0) for row in codes.tolist()) / 6
    assert float(CauchyQuantizationLoss(gamma=20.0)(codes)) == pytest.approx(naive, rel=1e-5)
    assert float(CauchyQuantizationLoss()(torch.tensor([[1.0, -1.0, -1.0, 1.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_losses_by_name_and_bad_gamma():
    assert isinstance(create_loss("cauchy", gamma=10.0), CauchyHashingLoss)
    assert isinstance(create_loss("cauchy_quantization"), CauchyQuantizationLoss)
    assert isinstance(create_loss("pair_adversarial"), PairAdversarialLoss)
    assert create_loss("prior_adversarial", binary=True).binary
    with pytest.raises(ValueError):
        CauchyHashingLoss(gamma=0.0)


def test_same_class_partners():
    labels = torch.tensor([0, 1, 0, 2, 0, 1])
    seen: dict[int, set[int]] = {}
    for seed in range(40):
        anchors, partners = same_class_partners(labels, torch.Generator().manual_seed(seed))
        assert anchors.tolist() == [0, 1, 2, 4, 5]  # item 3 is alone in its class
        assert (labels[anchors] == labels[partners]).all() and (anchors != partners).all()
        for a, p in zip(anchors.tolist(), partners.tolist()):
            seen.setdefault(a, set()).add(p)
    assert seen[0] == {2, 4} and seen[1] == {5}  # every candidate is drawn
    none, _ = same_class_partners(torch.tensor([0, 1, 2]))
    assert none.numel() == 0


def naive_bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_pair_adversarial_losses_match_naive_loop():
    torch.manual_seed(0)
    disc = CodePairDiscriminator(feature_dim=4, bits=8, hidden=6)
    features, codes = torch.randn(5, 4), torch.tanh(torch.randn(5, 8))
    anchors, partners = torch.tensor([0, 1, 3]), torch.tensor([1, 0, 4])
    adv = PairAdversarialLoss()

    @torch.no_grad()
    def logit(i, j):
        return float(disc(features[i : i + 1], codes[j : j + 1]))

    real = [logit(a, a) for a in anchors.tolist()]
    swapped = [logit(a, p) for a, p in zip(anchors.tolist(), partners.tolist())]
    d_naive = 0.5 * (sum(naive_bce(x, 1) for x in real) / 3 + sum(naive_bce(x, 0) for x in swapped) / 3)
    g_naive = 0.5 * (sum(naive_bce(x, 0) for x in real) / 3 + sum(naive_bce(x, 1) for x in swapped) / 3)
    with torch.no_grad():
        d_loss = adv.discriminator_loss(disc, features, codes, anchors, partners)
        g_loss = adv.generator_loss(disc, features, codes, anchors, partners)
    assert float(d_loss) == pytest.approx(d_naive, rel=1e-5) and float(g_loss) == pytest.approx(g_naive, rel=1e-5)


def test_adversary_gradients_go_where_they_should():
    torch.manual_seed(1)
    disc = CodePairDiscriminator(feature_dim=4, bits=8, hidden=6)
    features = torch.randn(4, 4, requires_grad=True)
    codes = torch.randn(4, 8, requires_grad=True)
    anchors, partners = torch.tensor([0, 1]), torch.tensor([1, 0])
    PairAdversarialLoss().discriminator_loss(disc, features, codes, anchors, partners).backward()
    assert features.grad is None and codes.grad is None  # trains the discriminator only
    assert all(p.grad is not None for p in disc.parameters())
    PairAdversarialLoss().generator_loss(disc, features.detach(), codes, anchors, partners).backward()
    assert codes.grad is not None and codes.grad.abs().sum() > 0
    none = torch.tensor([], dtype=torch.long)
    with pytest.raises(ValueError, match="same-class pair"):
        PairAdversarialLoss().discriminator_loss(disc, features, codes, none, none)


def test_straight_through_sign_is_sign_forward_and_identity_backward():
    h = torch.tensor([[-0.3, 0.2, 0.9], [0.5, -0.7, -0.1]], requires_grad=True)
    out = straight_through_sign(h)
    assert out.tolist() == [[-1.0, 1.0, 1.0], [1.0, -1.0, -1.0]]
    (out * torch.arange(6.0).reshape(2, 3)).sum().backward()
    assert h.grad.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_a_binary_pair_adversary_judges_sign_codes():
    torch.manual_seed(2)
    disc = CodePairDiscriminator(feature_dim=4, bits=8, hidden=6)
    features = torch.randn(5, 4)
    codes = torch.tanh(torch.randn(5, 8)).requires_grad_()
    anchors, partners = torch.tensor([0, 1, 3]), torch.tensor([1, 0, 4])
    binary, relaxed = PairAdversarialLoss(binary=True), PairAdversarialLoss()
    signs = torch.sign(codes.detach())
    for name in ("discriminator_loss", "generator_loss"):
        got = getattr(binary, name)(disc, features, codes, anchors, partners)
        want = getattr(relaxed, name)(disc, features, signs, anchors, partners)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    binary.generator_loss(disc, features, codes, anchors, partners).backward()
    assert codes.grad.abs().sum() > 0  # the straight-through gradient reaches the relaxed codes


def test_prior_adversary_matches_naive_loop_and_draws_balanced_codes():
    torch.manual_seed(3)
    disc = CodePairDiscriminator(feature_dim=0, bits=8, hidden=6)
    codes = torch.tanh(torch.randn(6, 8)).requires_grad_()
    prior = PriorAdversarialLoss.sample_prior(codes, torch.Generator().manual_seed(0))
    assert set(prior.unique().tolist()) == {-1.0, 1.0} and prior.shape == codes.shape

    @torch.no_grad()
    def logit(code):
        return float(disc.net(code[None]))  # no feature columns at all

    adv = PriorAdversarialLoss()
    d_naive = 0.5 * (
        sum(naive_bce(logit(p), 1) for p in prior) / 6 + sum(naive_bce(logit(c), 0) for c in codes.detach()) / 6
    )
    g_naive = sum(naive_bce(logit(c), 1) for c in codes.detach()) / 6
    d_loss = adv.discriminator_loss(disc, codes, prior)
    assert float(d_loss.detach()) == pytest.approx(d_naive, rel=1e-5)
    d_loss.backward()
    assert codes.grad is None  # the discriminator's loss trains the discriminator only
    g_loss = adv.generator_loss(disc, codes)
    assert float(g_loss.detach()) == pytest.approx(g_naive, rel=1e-5)
    g_loss.backward()
    assert codes.grad.abs().sum() > 0
    draws = PriorAdversarialLoss.sample_prior(torch.zeros(4000, 8), torch.Generator().manual_seed(1))
    assert draws.mean(dim=0).abs().max() < 0.06  # every bit balanced


def clustered(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, d)) * 3
    labels = rng.integers(0, 5, n)
    return centres[labels] + rng.standard_normal((n, d)), labels


def test_itq_rotation_is_orthogonal_and_lowers_quantisation_error():
    x, _ = clustered(600, 32, 0)
    itq = ITQ(bits=16, seed=0).fit(x)
    assert np.allclose(itq.rotation @ itq.rotation.T, np.eye(16), atol=1e-8)
    errors = itq.quantization_error
    assert errors[-1] < errors[0] and all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))  # monotone
    codes = itq.encode(x)
    assert codes.shape == (600, 2) and codes.dtype == np.uint8
    # Same seed, same codes; the codes are the signs of the projection.
    assert np.array_equal(ITQ(bits=16, seed=0).fit(x).encode(x), codes)
    assert np.array_equal(np.unpackbits(codes, axis=1).astype(bool), itq.project(x) > 0)


def test_lsh_and_itq_codes_keep_neighbours():
    x, labels = clustered(400, 32, 1)
    for hasher in (LSH(bits=32, seed=0), ITQ(bits=32, seed=0)):
        codes = np.unpackbits(hasher.fit(x).encode(x), axis=1)
        dist = (codes[:, None, :] != codes[None, :, :]).sum(axis=2)
        same = labels[:, None] == labels[None, :]
        assert dist[same].mean() < 0.5 * dist[~same].mean(), type(hasher).__name__


def test_projection_hashing_errors():
    with pytest.raises(ValueError):
        LSH(bits=12)
    with pytest.raises(ValueError):
        ITQ(bits=64).fit(np.zeros((10, 32)))
    with pytest.raises(RuntimeError):
        LSH(bits=8).encode(np.zeros((1, 8)))
