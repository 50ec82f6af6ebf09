"""GSN losses and the grid score map against naive loops, their gradient directions and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval_core.losses.gsn import GridScoreLoss, GridSoftmaxLoss, grid_scores


def naive_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def naive_score_loss(scores: list[list[float]], positive: list[int], m_pos: float, m_neg: float) -> float:
    total = 0.0
    for row, p in zip(scores, positive):
        for c, s in enumerate(row):
            total += max(0.0, m_pos - s) ** 2 if c == p else max(0.0, s - m_neg) ** 2
    return total / (len(scores) * len(scores[0]))


def naive_softmax_loss(scores: list[list[float]], positive: list[int], t: float) -> float:
    total = 0.0
    for row, p in zip(scores, positive):
        total += -(row[p] / t - math.log(sum(math.exp(s / t) for s in row)))
    return total / len(scores)


def random_grid(seed: int, n: int = 6, cells: int = 9, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g),
        torch.randn(n, cells, d, generator=g),
        torch.randint(cells, (n,), generator=g),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_grid_scores_match_a_naive_loop(seed):
    q, c, _ = random_grid(seed)
    got = grid_scores(q, c)
    for i in range(q.shape[0]):
        for j in range(c.shape[1]):
            assert float(got[i, j]) == pytest.approx(naive_cosine(q[i].tolist(), c[i, j].tolist()), abs=1e-5)


@pytest.mark.parametrize(("m_pos", "m_neg"), [(0.9, 0.0), (0.5, -0.2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_score_loss_matches_a_naive_loop(seed, m_pos, m_neg):
    q, c, pos = random_grid(seed)
    scores = grid_scores(q, c)
    got = GridScoreLoss(pos_margin=m_pos, neg_margin=m_neg)(scores, pos)
    assert float(got) == pytest.approx(naive_score_loss(scores.tolist(), pos.tolist(), m_pos, m_neg), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_loss_matches_a_naive_loop(seed, temperature):
    q, c, pos = random_grid(seed)
    scores = grid_scores(q, c).double()
    got = GridSoftmaxLoss(temperature)(scores, pos)
    assert float(got) == pytest.approx(naive_softmax_loss(scores.tolist(), pos.tolist(), temperature), rel=1e-9)


@pytest.mark.parametrize("loss", [GridScoreLoss(), GridSoftmaxLoss(0.5)], ids=["score", "softmax"])
def test_a_gradient_step_raises_the_positive_and_lowers_the_negatives(loss):
    # Positive below its margin, negatives above theirs: every cell has something to learn.
    scores = torch.tensor([[0.3, 0.5, 0.2, 0.4, 0.1, 0.6, 0.3, 0.2, 0.5]], requires_grad=True)
    pos = torch.tensor([4])
    loss(scores, pos).backward()
    step = -scores.grad[0]  # the direction gradient descent moves the scores
    assert step[4] > 0
    assert torch.all(torch.cat([step[:4], step[5:]]) < 0)


def test_score_loss_is_zero_past_the_margins():
    scores = torch.tensor([[0.95, -0.1, -0.3], [-0.2, 0.0, 0.9]])
    assert float(GridScoreLoss()(scores, torch.tensor([0, 2]))) == 0.0


def test_gradients_reach_the_embeddings():
    q, c, pos = random_grid(0)
    q.requires_grad_(True)
    c.requires_grad_(True)
    GridScoreLoss()(grid_scores(q, c), pos).backward()
    assert q.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", [GridScoreLoss(), GridSoftmaxLoss()], ids=["score", "softmax"])
def test_bad_positions_and_shapes_are_refused(loss):
    scores = torch.zeros(2, 9)
    for bad in (torch.tensor([0, 9]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="must be in"):
            loss(scores, bad)
    with pytest.raises(ValueError):
        loss(scores, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        loss(scores, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        loss(torch.zeros(2, 3, 3), torch.tensor([0, 1]))


def test_bad_configurations_and_embeddings_are_refused():
    with pytest.raises(ValueError):
        GridScoreLoss(pos_margin=0.0, neg_margin=0.5)
    with pytest.raises(ValueError):
        GridSoftmaxLoss(temperature=0.0)
    with pytest.raises(ValueError):
        grid_scores(torch.zeros(2, 4), torch.zeros(3, 9, 4))
    with pytest.raises(ValueError):
        grid_scores(torch.zeros(2, 4), torch.zeros(2, 9, 5))


def test_the_losses_are_created_by_name():
    from retrieval_core.losses import create_loss

    assert isinstance(create_loss("gsn_score", pos_margin=0.8), GridScoreLoss)
    assert isinstance(create_loss("gsn_softmax", temperature=0.2), GridSoftmaxLoss)
    assert create_loss("gsn_triplet", margin=0.3).margin == 0.3
