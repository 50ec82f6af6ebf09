"""Grid Search Network losses: train an embedding as a search over a grid of candidates.

A query and the ``C`` cells of its grid (one positive, ``C - 1`` negatives) are embedded by one backbone;
``grid_scores`` turns them into a score map ``(n, C)``, and a loss pushes the positive cell's score up and the
others down. ``GridScoreLoss`` is the paper's per-cell squared hinge; ``GridSoftmaxLoss`` is the cross-entropy
alternative its follow-ups use; ``GridTripletLoss`` is the triplet baseline on the same grids. All take the
scores and the positive's position, so the score map (cosine here, or a learned 1x1 conv) can change without
touching them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


def grid_scores(query_emb: torch.Tensor, cell_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query with each cell of its grid: ``(n, d)`` and ``(n, C, d)`` -> ``(n, C)``."""
    if query_emb.ndim != 2 or cell_emb.ndim != 3 or cell_emb.shape[0] != query_emb.shape[0]:
        raise ValueError(f"need query (n, d) and cells (n, C, d), got {tuple(query_emb.shape)} {tuple(cell_emb.shape)}")
    if cell_emb.shape[2] != query_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: query {query_emb.shape[1]}, cells {cell_emb.shape[2]}")
    q = F.normalize(query_emb, dim=-1, eps=_EPS)
    c = F.normalize(cell_emb, dim=-1, eps=_EPS)
    return torch.einsum("nd,ncd->nc", q, c)


def _check(scores: torch.Tensor, positive_pos: torch.Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n, C), got shape {tuple(scores.shape)}")
    if positive_pos.ndim != 1 or positive_pos.shape[0] != scores.shape[0]:
        raise ValueError(f"positive_pos must be ({scores.shape[0]},), got shape {tuple(positive_pos.shape)}")
    if positive_pos.dtype.is_floating_point or positive_pos.dtype == torch.bool:
        raise ValueError(f"positive_pos must hold integer positions, got {positive_pos.dtype}")
    if positive_pos.numel() and (int(positive_pos.min()) < 0 or int(positive_pos.max()) >= scores.shape[1]):
        raise ValueError(f"positive_pos must be in [0, {scores.shape[1]}), got {positive_pos.tolist()}")


class GridScoreLoss(nn.Module):
    """The GSN paper's loss on the score map: ``y max(0, m_pos - s)^2 + (1 - y) max(0, s - m_neg)^2``.

    ``y`` is 1 at the positive cell and 0 elsewhere; the loss is averaged over the cells of a grid, then over
    the grids. Scores past their margin cost nothing, so well-separated grids stop pulling.

    Args:
        pos_margin: the positive's score is pushed up to this (the paper: 0.9 on cosine scores).
        neg_margin: every negative's score is pushed down to this (the paper: 0).
    """

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.0) -> None:
        super().__init__()
        if not neg_margin < pos_margin:
            raise ValueError(f"neg_margin must be below pos_margin, got {neg_margin} >= {pos_margin}")
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def forward(self, scores: torch.Tensor, positive_pos: torch.Tensor) -> torch.Tensor:
        _check(scores, positive_pos)
        y = F.one_hot(positive_pos.long(), scores.shape[1]).to(scores.dtype)
        pull = F.relu(self.pos_margin - scores).square()
        push = F.relu(scores - self.neg_margin).square()
        return (y * pull + (1.0 - y) * push).mean()


class GridSoftmaxLoss(nn.Module):
    """Cross-entropy of picking the positive among the cells: ``-log softmax(s / t)[positive]``, mean over grids.

    Args:
        temperature: ``t``; cosine scores live in [-1, 1], so a small ``t`` (0.05 to 0.2) sharpens the choice.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, scores: torch.Tensor, positive_pos: torch.Tensor) -> torch.Tensor:
        _check(scores, positive_pos)
        return F.cross_entropy(scores / self.temperature, positive_pos.long())


class GridTripletLoss(nn.Module):
    """The ablation baseline: a triplet hinge per negative cell, ``max(0, margin - s_pos + s_neg)``, mean over
    the negatives, then the grids. On the score map of the same grids as the grid losses, so a GSN run and its
    triplet baseline differ only in the loss.

    Args:
        margin: the positive's score must beat every negative's by this much (cosine scores: 0.2 is standard).
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin

    def forward(self, scores: torch.Tensor, positive_pos: torch.Tensor) -> torch.Tensor:
        _check(scores, positive_pos)
        if scores.shape[1] < 2:
            raise ValueError(f"a triplet needs a negative: scores must have >= 2 cells, got {scores.shape[1]}")
        n, cells = scores.shape
        positive = F.one_hot(positive_pos.long(), cells).bool()
        s_pos = scores[positive].view(n, 1)
        s_neg = scores[~positive].view(n, cells - 1)
        return F.relu(self.margin - s_pos + s_neg).mean()
