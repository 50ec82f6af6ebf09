"""Metric-learning losses: small modules, distances injected, tested against naive loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=1)
    return x @ x.t()


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020), the "L_out" form.

    For each anchor i with at least one positive (same label, j != i):
    ``-mean_{p in P(i)} log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) )``, averaged over anchors.

    Args:
        temperature: softmax temperature t.
        similarity: (N, D) -> (N, N) similarity function; cosine by default.
    """

    def __init__(self, temperature: float = 0.1, similarity=cosine_similarity_matrix) -> None:
        super().__init__()
        self.temperature = temperature
        self.similarity = similarity

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = features.shape[0]
        logits = self.similarity(features) / self.temperature
        self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = positives.sum(dim=1)
        has_pos = n_pos > 0
        if not has_pos.any():
            return features.sum() * 0.0
        pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
        return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


class QuantizationLoss(nn.Module):
    """Pulls relaxed codes in [-1, 1] towards the binary corners: ``mean((|h| - 1)^2)``."""

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.abs() - 1.0).pow(2).mean()
